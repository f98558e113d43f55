//! Small files sealed whole with encryption at rest on: refused source rows (the row as read)
//! and source notes. Each is one JSON object, `{"estafeta_sealed_file":1,"what":…,"sealed":…}`,
//! the sealed unit carrying its own data key (as a dead letter does), bound to what the file is
//! and its name, so a sealed file cannot pass for another. A file without that field is read as
//! the plain file it is (written before the key was set).

use crate::crypt::{KeyError, Keyring, SealedUnit};

const FORMAT: u32 = 1;

#[derive(serde::Serialize, serde::Deserialize)]
struct SealedFile {
    estafeta_sealed_file: u32,
    what: String,
    sealed: SealedUnit,
}

fn aad(what: &str, name: &str) -> Vec<u8> {
    format!("estafeta sealed file v{FORMAT}\n{what}\n{name}").into_bytes()
}

/// The bytes of a file holding `plain`, sealed; `name` is the file's name.
pub fn seal(keys: &Keyring, what: &str, name: &str, plain: &[u8]) -> Vec<u8> {
    let unit = keys.new_data_key().seal(plain, &aad(what, name));
    let mut bytes = serde_json::to_vec_pretty(&SealedFile {
        estafeta_sealed_file: FORMAT,
        what: what.to_owned(),
        sealed: unit,
    })
    .expect("a sealed file serializes");
    bytes.push(b'\n');
    bytes
}

/// What a file holds: opened when sealed (with `keys`), as it is when plain.
pub fn open(
    keys: Option<&Keyring>,
    what: &str,
    name: &str,
    bytes: Vec<u8>,
) -> Result<Vec<u8>, KeyError> {
    let Ok(file) = serde_json::from_slice::<SealedFile>(&bytes) else {
        return Ok(bytes);
    };
    let Some(keys) = keys else {
        return Err(KeyError::Missing(file.sealed.kid));
    };
    keys.open(&file.sealed, &aad(what, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_file_opens_under_its_name_only_and_a_plain_one_passes() {
        let keys = Keyring::generate();
        let bytes = seal(&keys, "refused row", "a.json", b"{\"nome\":\"Ana\"}");
        assert!(!String::from_utf8_lossy(&bytes).contains("Ana"));
        assert_eq!(
            open(Some(&keys), "refused row", "a.json", bytes.clone()).unwrap(),
            b"{\"nome\":\"Ana\"}"
        );
        assert!(matches!(
            open(Some(&keys), "refused row", "b.json", bytes.clone()),
            Err(KeyError::Damaged(_))
        ));
        assert!(matches!(
            open(None, "refused row", "a.json", bytes),
            Err(KeyError::Missing(_))
        ));
        assert_eq!(
            open(None, "refused row", "a.json", b"{\"plain\":1}".to_vec()).unwrap(),
            b"{\"plain\":1}"
        );
    }
}
