//! How a key file's bytes are kept on disk. On Windows they are protected with DPAPI in machine
//! scope (`CryptProtectData` with `CRYPTPROTECT_LOCAL_MACHINE`): the file opens only on the
//! machine that wrote it, so a copied disk or a backup of `C:\ProgramData\Estafeta` carries no
//! usable key, whatever its access list said. Elsewhere the bytes are the JSON as it is and the
//! file's mode (0600, owned by the service user) protects it (crypt.rs refuses a looser one).
//!
//! A protected file starts with [`DPAPI_MAGIC`]; a file without it is read as plain JSON on
//! every platform (a key file restored from `estafeta key export`, or made on Linux), and the
//! next save on Windows protects it.

/// First bytes of a DPAPI-protected key file, then the protected blob.
pub const DPAPI_MAGIC: &[u8] = b"estafeta-key-dpapi-v1\n";

/// The key file's JSON from its bytes on disk.
pub fn unprotect(bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    match bytes.strip_prefix(DPAPI_MAGIC) {
        None => Ok(bytes),
        Some(blob) => imp::unprotect(blob),
    }
}

/// The bytes to write for a key file's JSON: protected on Windows (unless `plain`, for an
/// export meant for a backup), as they are elsewhere.
pub fn protect(json: Vec<u8>, plain: bool) -> Result<Vec<u8>, String> {
    if plain || !cfg!(windows) {
        return Ok(json);
    }
    let mut out = DPAPI_MAGIC.to_vec();
    out.extend(imp::protect(&json)?);
    Ok(out)
}

#[cfg(windows)]
#[allow(unsafe_code)] // DPAPI is a C API: two calls and a LocalFree, each checked.
mod imp {
    use windows_sys::Win32::Foundation::{GetLastError, LocalFree};
    use windows_sys::Win32::Security::Cryptography::{
        CRYPT_INTEGER_BLOB, CRYPTPROTECT_LOCAL_MACHINE, CRYPTPROTECT_UI_FORBIDDEN,
        CryptProtectData, CryptUnprotectData,
    };

    fn blob(bytes: &[u8]) -> Result<CRYPT_INTEGER_BLOB, String> {
        Ok(CRYPT_INTEGER_BLOB {
            cbData: u32::try_from(bytes.len()).map_err(|_| "key file too large".to_owned())?,
            pbData: bytes.as_ptr().cast_mut(),
        })
    }

    /// Copies DPAPI's output and frees it.
    fn take(out: CRYPT_INTEGER_BLOB) -> Vec<u8> {
        // SAFETY: DPAPI returned `cbData` bytes at `pbData`, allocated with LocalAlloc.
        let bytes = unsafe { std::slice::from_raw_parts(out.pbData, out.cbData as usize) }.to_vec();
        // SAFETY: `pbData` came from DPAPI, which documents LocalFree as its release.
        unsafe { LocalFree(out.pbData.cast()) };
        bytes
    }

    pub fn protect(plain: &[u8]) -> Result<Vec<u8>, String> {
        let input = blob(plain)?;
        let mut out = CRYPT_INTEGER_BLOB::default();
        // SAFETY: every pointer is valid for the call; optional ones are null.
        let ok = unsafe {
            CryptProtectData(
                &input,
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
                CRYPTPROTECT_LOCAL_MACHINE | CRYPTPROTECT_UI_FORBIDDEN,
                &mut out,
            )
        };
        if ok == 0 {
            // SAFETY: reads the calling thread's last error.
            let code = unsafe { GetLastError() };
            return Err(format!(
                "Windows DPAPI could not protect the key file (error {code})"
            ));
        }
        Ok(take(out))
    }

    pub fn unprotect(blob_bytes: &[u8]) -> Result<Vec<u8>, String> {
        let input = blob(blob_bytes)?;
        let mut out = CRYPT_INTEGER_BLOB::default();
        // SAFETY: every pointer is valid for the call; optional ones are null.
        let ok = unsafe {
            CryptUnprotectData(
                &input,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
                CRYPTPROTECT_UI_FORBIDDEN,
                &mut out,
            )
        };
        if ok == 0 {
            // SAFETY: reads the calling thread's last error.
            let code = unsafe { GetLastError() };
            return Err(format!(
                "Windows DPAPI could not open the key file (error {code}): it opens only on the machine that wrote it; on another machine restore the copy made with `estafeta key export`"
            ));
        }
        Ok(take(out))
    }
}

#[cfg(not(windows))]
mod imp {
    pub fn protect(plain: &[u8]) -> Result<Vec<u8>, String> {
        Ok(plain.to_vec())
    }

    pub fn unprotect(_blob: &[u8]) -> Result<Vec<u8>, String> {
        Err("this key file is protected by Windows DPAPI and opens only on the Windows machine that wrote it; there, run `estafeta key export PATH` for a copy that opens anywhere".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_protected(bytes: &[u8]) -> bool {
        bytes.starts_with(DPAPI_MAGIC)
    }

    #[test]
    fn plain_json_passes_through_and_a_protected_file_is_recognised() {
        let json = br#"{"estafeta_key_file":1}"#.to_vec();
        assert!(!is_protected(&json));
        assert_eq!(unprotect(json.clone()).unwrap(), json);
        let written = protect(json.clone(), false).unwrap();
        if cfg!(windows) {
            assert!(is_protected(&written));
            assert!(!written.windows(json.len()).any(|w| w == json.as_slice()));
            assert_eq!(unprotect(written).unwrap(), json);
        } else {
            assert_eq!(written, json);
            let mut foreign = DPAPI_MAGIC.to_vec();
            foreign.extend_from_slice(b"\x01\x00\x00\x00opaque");
            let err = unprotect(foreign).unwrap_err();
            assert!(err.contains("Windows DPAPI"), "{err}");
        }
        assert_eq!(protect(json.clone(), true).unwrap(), json);
    }
}
