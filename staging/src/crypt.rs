//! Encryption at rest (issue 23): the key file, the data keys of segments and dead letters,
//! and the sealing of index fields.
//!
//! - The **key file** (`STAGING_KEY_FILE`, 0600) holds every key-encryption key the folder may
//!   still use, the newest last, plus one secret for the index's keyed hashes. A key's id is
//!   derived from its bytes, so the same id always means the same key: a tag that fails under
//!   the right id is damage, an id the key file lacks is a missing key, never damage.
//! - Each **segment** gets its own random data key, wrapped (AES-256-GCM) by the current key
//!   and written, wrapped, in each of its sealed lines with the key's id: a line is readable
//!   on its own, as a plain one is, and a rebuild of the index needs only the folder and the
//!   key file.
//! - A sealed line keeps in clear what a person and the store need for order and routing
//!   (`v`, `id`, `seq`, `action`, `entity`, `staged_at`, `sinks`), all bound as associated data
//!   so they cannot be swapped between lines; the record key, the client key and fingerprint,
//!   the source checkpoint and the payload are in the ciphertext.
//! - The **index** never holds a record key or client key in clear: it keeps a keyed hash
//!   (HMAC-SHA-256 with the key file's index secret, stable across rotations), which is all
//!   ordering and idempotency need (equality). Texts that can echo a payload (a server's
//!   answer in `last_error`) are sealed with the current key.
//!
//! AES-256-GCM from `ring`, already linked through rustls: no new crate.

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use crate::data_keys::{DataKeySlots, Slot};

const KEY_LEN: usize = 32;
const FILE_FORMAT: u32 = 1;
/// Associated data of a wrapped data key.
const WRAP_AAD: &[u8] = b"estafeta data key v1";
/// Prefix of a sealed text in the index.
const SEALED_TEXT: &str = "sealed:v1:";
/// Unwrapped data keys kept in memory (one per segment read): bounded, cleared when full.
const DK_CACHE: usize = 1024;

/// Why a key file or a sealed unit could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read, written or parsed; the text says what to do.
    #[error("{0}")]
    File(String),
    /// A sealed unit names a key the key file does not hold.
    #[error(
        "this needs key {0}, which the key file does not hold: set STAGING_KEY_FILE to the key file that holds it (a key file made by `estafeta key generate` or `estafeta key rotate`)"
    )]
    Missing(String),
    /// The bytes do not open under the key they name: they were changed or damaged.
    #[error("{0}")]
    Damaged(String),
    /// A segment's data key is no longer in `_state/data-keys`: forgotten when its segment was
    /// deleted (crypto-shredding), or that file was lost. Never damage.
    #[error(
        "the data key {dkid} (under key {kid}) is not in _state/data-keys: it was forgotten when its segment was deleted, or that file was lost; restore _state/data-keys from the same backup as the segment"
    )]
    Forgotten { kid: String, dkid: String },
}

#[derive(serde::Serialize, serde::Deserialize)]
struct KeyFile {
    estafeta_key_file: u32,
    index_secret: String,
    keys: Vec<KeyEntry>,
}

#[derive(serde::Serialize, serde::Deserialize, Clone)]
struct KeyEntry {
    id: String,
    secret: String,
    created: String,
}

struct Kek {
    id: String,
    key: LessSafeKey,
}

/// The keys of a key file, ready to seal and open. Never printed.
pub struct Keyring {
    entries: Vec<KeyEntry>,
    keks: Vec<Kek>,
    index: ring::hmac::Key,
    index_secret: Vec<u8>,
    rng: SystemRandom,
    data_keys: Mutex<HashMap<String, Arc<LessSafeKey>>>,
    /// The `_state/data-keys` of the folders opened with these keys, where sealed lines find
    /// their segment's data key by id (data_keys.rs).
    slots: RwLock<Vec<Arc<DataKeySlots>>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("ids", &self.ids())
            .finish_non_exhaustive()
    }
}

fn random<const N: usize>(rng: &SystemRandom) -> [u8; N] {
    let mut out = [0u8; N];
    rng.fill(&mut out)
        .expect("the operating system's random source failed");
    out
}

fn aes(bytes: &[u8]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32-byte key"))
}

/// The permission bits that make a key file refused: any for group or others, except in the
/// credentials folder systemd gives the service (`$CREDENTIALS_DIRECTORY`, from
/// `LoadCredentialEncrypted=`, see `/usr/lib/estafeta/staging-key-credential`). Newer systemd
/// (≥ 253 on tmpfs) makes a credential root's, mode 0440, readable by the service's user through
/// an ACL, whose mask is what the group bits show; that folder is mounted for the service alone.
/// Others' bits are refused there too.
#[cfg(unix)]
fn refused_mode_bits(path: &Path, credentials_dir: Option<&std::ffi::OsStr>) -> u32 {
    let inside = credentials_dir
        .filter(|dir| !dir.is_empty())
        .and_then(|dir| {
            Some((
                Path::new(dir).canonicalize().ok()?,
                path.canonicalize().ok()?,
            ))
        })
        .is_some_and(|(dir, file)| file.starts_with(dir));
    if inside { 0o007 } else { 0o077 }
}

/// A key's id: the first 8 bytes of SHA-256 of its bytes, in hex.
fn key_id(secret: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, secret);
    let hex: String = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("k-{hex}")
}

fn decode_b64(what: &str, text: &str) -> Result<Vec<u8>, KeyError> {
    B64.decode(text)
        .map_err(|e| KeyError::Damaged(format!("{what} is not base64: {e}")))
}

impl Keyring {
    /// A new key file's content: one random key and a random index secret.
    pub fn generate() -> Keyring {
        let rng = SystemRandom::new();
        let index_secret: [u8; KEY_LEN] = random(&rng);
        let mut ring = Keyring::build(Vec::new(), index_secret.to_vec()).expect("fresh keys");
        ring.add_key();
        ring
    }

    fn build(entries: Vec<KeyEntry>, index_secret: Vec<u8>) -> Result<Keyring, KeyError> {
        let mut keks = Vec::with_capacity(entries.len());
        for e in &entries {
            let secret = B64
                .decode(&e.secret)
                .map_err(|err| KeyError::File(format!("key {} is not base64: {err}", e.id)))?;
            if secret.len() != KEY_LEN || key_id(&secret) != e.id {
                return Err(KeyError::File(format!(
                    "key {} is damaged (wrong length or its bytes do not match its id)",
                    e.id
                )));
            }
            keks.push(Kek {
                id: e.id.clone(),
                key: aes(&secret),
            });
        }
        Ok(Keyring {
            entries,
            keks,
            index: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &index_secret),
            index_secret,
            rng: SystemRandom::new(),
            data_keys: Mutex::new(HashMap::new()),
            slots: RwLock::new(Vec::new()),
        })
    }

    fn add_key(&mut self) -> String {
        let secret: [u8; KEY_LEN] = random(&self.rng);
        let id = key_id(&secret);
        self.entries.push(KeyEntry {
            id: id.clone(),
            secret: B64.encode(secret),
            created: crate::layout::rfc3339(chrono::Utc::now()),
        });
        self.keks.push(Kek {
            id: id.clone(),
            key: aes(&secret),
        });
        id
    }

    /// Adds a new key that seals everything written from now on; the older keys stay to open
    /// what they sealed. Returns the new key's id.
    pub fn rotate(&mut self) -> String {
        self.add_key()
    }

    /// Drops the keys not in `keep` (the current key always stays); returns the dropped ids.
    pub fn retain(&mut self, keep: &[String]) -> Vec<String> {
        let current = self.current_id().to_owned();
        let dropped: Vec<String> = self
            .entries
            .iter()
            .filter(|e| e.id != current && !keep.contains(&e.id))
            .map(|e| e.id.clone())
            .collect();
        self.entries.retain(|e| !dropped.contains(&e.id));
        self.keks.retain(|k| !dropped.contains(&k.id));
        dropped
    }

    /// The id of the key that seals new data.
    pub fn current_id(&self) -> &str {
        &self.keks.last().expect("a key file holds a key").id
    }

    /// Every key id, oldest first.
    pub fn ids(&self) -> Vec<String> {
        self.keks.iter().map(|k| k.id.clone()).collect()
    }

    pub fn has(&self, id: &str) -> bool {
        self.keks.iter().any(|k| k.id == id)
    }

    /// Reads a key file. On Unix, one that others may read is refused: the key is what protects
    /// the patient data, and a readable key protects nothing.
    pub fn load(path: &Path) -> Result<Keyring, KeyError> {
        let bytes = std::fs::read(path).map_err(|e| {
            KeyError::File(format!(
                "cannot read the key file {} (STAGING_KEY_FILE): {e}; `estafeta key generate {}` makes a new one (only for a new staging folder: data sealed with a lost key cannot be read)",
                path.display(),
                path.display()
            ))
        })?;
        let text = crate::key_protect::unprotect(bytes)
            .map_err(|e| KeyError::File(format!("{}: {e}", path.display())))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0);
            let credentials = std::env::var_os("CREDENTIALS_DIRECTORY");
            if mode & refused_mode_bits(path, credentials.as_deref()) != 0 {
                return Err(KeyError::File(format!(
                    "the key file {} can be read by other users (mode {mode:o}): run `chmod 600 {}` and check who copied it",
                    path.display(),
                    path.display()
                )));
            }
        }
        let file: KeyFile = serde_json::from_slice(&text).map_err(|e| {
            KeyError::File(format!(
                "{} is not an Estafeta key file ({e}); use the file `estafeta key generate` wrote",
                path.display()
            ))
        })?;
        if file.estafeta_key_file != FILE_FORMAT {
            return Err(KeyError::File(format!(
                "{} is a key file of format {}; this version reads format {FILE_FORMAT}",
                path.display(),
                file.estafeta_key_file
            )));
        }
        if file.keys.is_empty() {
            return Err(KeyError::File(format!("{} holds no key", path.display())));
        }
        let index_secret = B64
            .decode(&file.index_secret)
            .map_err(|e| KeyError::File(format!("{}: index secret: {e}", path.display())))?;
        Keyring::build(file.keys, index_secret)
    }

    /// Writes the key file: a new file (`create_new`, 0600) or, with `replace`, over the old one
    /// atomically (a `.tmp` beside it, then a rename), so a crash leaves the old or the new file;
    /// the new file keeps the old one's owner (root rotating the service user's key).
    pub fn save(&self, path: &Path, replace: bool) -> Result<(), KeyError> {
        self.write(path, replace, false)
    }

    /// Writes a copy of the key file that opens anywhere (on Windows, without DPAPI), for a
    /// backup kept apart from the machine; a new file, never over an existing one.
    pub fn export(&self, path: &Path) -> Result<(), KeyError> {
        self.write(path, false, true)
    }

    fn write(&self, path: &Path, replace: bool, plain: bool) -> Result<(), KeyError> {
        let file = KeyFile {
            estafeta_key_file: FILE_FORMAT,
            index_secret: B64.encode(&self.index_secret),
            keys: self.entries.clone(),
        };
        let mut text = serde_json::to_vec_pretty(&file).expect("key file serializes");
        text.push(b'\n');
        let text = crate::key_protect::protect(text, plain)
            .map_err(|e| KeyError::File(format!("{}: {e}", path.display())))?;
        let fail = |e: std::io::Error| {
            KeyError::File(format!("cannot write the key file {}: {e}", path.display()))
        };
        if !replace {
            use std::io::Write;
            let mut f = crate::layout::private_file()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        KeyError::File(format!(
                            "{} exists already: it may be the key of staged data, so it is not overwritten; choose another path, or `estafeta key rotate` to add a key to it",
                            path.display()
                        ))
                    } else {
                        fail(e)
                    }
                })?;
            f.write_all(&text).map_err(fail)?;
            f.sync_all().map_err(fail)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = crate::layout::sync_dir(dir);
            }
            return Ok(());
        }
        crate::layout::replace_file_keeping_owner(path, &text).map_err(fail)
    }

    /// Lets sealed lines of the folder whose slots these are find their data keys.
    pub fn attach(&self, slots: Arc<DataKeySlots>) {
        let mut all = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if !all.iter().any(|s| Arc::ptr_eq(s, &slots)) {
            all.push(slots);
        }
    }

    /// A new data key for the segment `segment` (its path under the root), kept in `slots`
    /// (flushed before this returns) and named by id in the segment's lines, so that it can be
    /// forgotten when the segment is deleted.
    pub fn new_segment_data_key(
        &self,
        slots: &DataKeySlots,
        segment: &str,
    ) -> std::io::Result<DataKey> {
        let mut dk = self.new_data_key();
        let id: [u8; 16] = random(&self.rng);
        let dkid: String = id.iter().map(|b| format!("{b:02x}")).collect();
        slots.add(&Slot {
            dkid: dkid.clone(),
            kid: dk.kid.clone(),
            wrapped: dk.wrapped.clone(),
            segment: segment.to_owned(),
        })?;
        dk.dkid = Some(dkid);
        Ok(dk)
    }

    /// The key id and wrapped data key a sealed unit names: its own (a dead letter, an index
    /// text, a line of an earlier version) or, by id, its segment's slot.
    fn wrapped_of(&self, unit: &SealedUnit) -> Result<(String, String), KeyError> {
        if let Some(dk) = &unit.dk {
            return Ok((unit.kid.clone(), dk.clone()));
        }
        let Some(dkid) = &unit.dkid else {
            return Err(KeyError::Damaged("a sealed unit names no data key".into()));
        };
        for slots in self.slots.read().unwrap_or_else(|e| e.into_inner()).iter() {
            match slots.lookup(dkid) {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => {}
                Err(e) => {
                    return Err(KeyError::File(format!(
                        "cannot read the data keys of the staging folder (_state/{}): {e}",
                        crate::data_keys::FILE
                    )));
                }
            }
        }
        Err(KeyError::Forgotten {
            kid: unit.kid.clone(),
            dkid: dkid.clone(),
        })
    }

    /// A new data key for a dead letter or an index text, wrapped by the current key, carried
    /// inside what it seals.
    pub fn new_data_key(&self) -> DataKey {
        let dk: [u8; KEY_LEN] = random(&self.rng);
        let kek = self.keks.last().expect("a key file holds a key");
        let nonce: [u8; NONCE_LEN] = random(&self.rng);
        let mut wrapped = dk.to_vec();
        kek.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(WRAP_AAD),
                &mut wrapped,
            )
            .expect("sealing a data key");
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&wrapped);
        DataKey {
            kid: kek.id.clone(),
            wrapped: B64.encode(blob),
            dkid: None,
            key: aes(&dk),
            counter: 0,
        }
    }

    fn unwrap(&self, kid: &str, wrapped: &str) -> Result<Arc<LessSafeKey>, KeyError> {
        let cache_key = format!("{kid}/{wrapped}");
        if let Some(k) = crate::store::lock(&self.data_keys).get(&cache_key) {
            return Ok(k.clone());
        }
        let kek = self
            .keks
            .iter()
            .find(|k| k.id == kid)
            .ok_or_else(|| KeyError::Missing(kid.to_owned()))?;
        let blob = decode_b64("wrapped data key", wrapped)?;
        if blob.len() != NONCE_LEN + KEY_LEN + AES_256_GCM.tag_len() {
            return Err(KeyError::Damaged(
                "wrapped data key has a wrong length".into(),
            ));
        }
        let (nonce, rest) = blob.split_at(NONCE_LEN);
        let mut rest = rest.to_vec();
        let dk = kek
            .key
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).expect("12 bytes"),
                Aad::from(WRAP_AAD),
                &mut rest,
            )
            .map_err(|_| {
                KeyError::Damaged(format!(
                    "the data key does not open under key {kid}: the bytes were changed or damaged"
                ))
            })?;
        let key = Arc::new(aes(dk));
        let mut cache = crate::store::lock(&self.data_keys);
        if cache.len() >= DK_CACHE {
            cache.clear();
        }
        cache.insert(cache_key, key.clone());
        Ok(key)
    }

    /// Opens a sealed unit: the data key `wrapped` under key `kid`, then `ct` under it.
    pub fn open(&self, unit: &SealedUnit, aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        let (kid, wrapped) = self.wrapped_of(unit)?;
        let dk = self.unwrap(&kid, &wrapped)?;
        let nonce = decode_b64("nonce", &unit.n)?;
        let nonce = Nonce::try_assume_unique_for_key(&nonce)
            .map_err(|_| KeyError::Damaged("nonce has a wrong length".into()))?;
        let mut ct = decode_b64("ciphertext", &unit.ct)?;
        let plain = dk
            .open_in_place(nonce, Aad::from(aad), &mut ct)
            .map_err(|_| {
                KeyError::Damaged(format!(
                    "the sealed content does not open under key {} (authentication failed): the bytes or the fields bound to them were changed or damaged",
                    unit.kid
                ))
            })?;
        let len = plain.len();
        ct.truncate(len);
        Ok(ct)
    }

    /// The index's stand-in for a record key or a client key: a keyed hash, equal for equal
    /// keys whichever key seals the data, that says nothing of the key without the key file.
    pub fn hash(&self, text: &str) -> String {
        let tag = ring::hmac::sign(&self.index, text.as_bytes());
        format!("h:{}", B64.encode(&tag.as_ref()[..18]))
    }

    /// Seals a text kept in the index (a server's answer): `sealed:v1:<kid>:<dk>:<n>:<ct>`.
    pub fn seal_text(&self, text: &str) -> String {
        let mut dk = self.new_data_key();
        let unit = dk.seal(text.as_bytes(), SEALED_TEXT.as_bytes());
        format!(
            "{SEALED_TEXT}{}:{}:{}:{}",
            unit.kid,
            unit.dk.as_deref().unwrap_or_default(),
            unit.n,
            unit.ct
        )
    }

    /// The text behind [`Keyring::seal_text`]; a plain text is returned as it is.
    pub fn reveal(keys: Option<&Keyring>, text: String) -> String {
        let Some(rest) = text.strip_prefix(SEALED_TEXT) else {
            return text;
        };
        let parts: Vec<&str> = rest.split(':').collect();
        let (Some(keys), [kid, dk, n, ct]) = (keys, parts.as_slice()) else {
            return "(sealed: needs the staging key)".into();
        };
        let unit = SealedUnit {
            kid: (*kid).into(),
            dk: Some((*dk).into()),
            dkid: None,
            n: (*n).into(),
            ct: (*ct).into(),
        };
        match keys.open(&unit, SEALED_TEXT.as_bytes()) {
            Ok(plain) => String::from_utf8_lossy(&plain).into_owned(),
            Err(e) => format!("(sealed text unreadable: {e})"),
        }
    }
}

/// Seals a text for the index when a keyring is set, else keeps it as it is.
pub fn seal_opt(keys: Option<&Keyring>, text: &str) -> String {
    match keys {
        Some(k) => k.seal_text(text),
        None => text.to_owned(),
    }
}

/// A data key in clear, with its wrapped form, for one segment or one dead letter. Nonces
/// count up from zero: the key is random and never used by anything else, so a counter is
/// unique without a random source per line.
pub struct DataKey {
    kid: String,
    wrapped: String,
    /// A segment's data key is named by this id in its lines (kept in `_state/data-keys`);
    /// `None`: the wrapped key goes inside what it seals.
    dkid: Option<String>,
    key: LessSafeKey,
    counter: u64,
}

impl DataKey {
    /// Seals `plain` (in place: it becomes the ciphertext and tag) and appends the sealed unit
    /// as a JSON object to `out`, base64 written straight into it: the writer thread seals
    /// every line of a group, so no intermediate string is made.
    pub fn seal_into(&mut self, plain: &mut Vec<u8>, aad: &[u8], out: &mut Vec<u8>) {
        let counter = self.reserve(1);
        self.seal_into_at(counter, plain, aad, out);
    }

    /// Reserves `n` nonces and returns the first: each is then used once by
    /// [`DataKey::seal_into_at`], on whichever thread, and never again.
    pub fn reserve(&mut self, n: u64) -> u64 {
        let first = self.counter + 1;
        self.counter += n;
        first
    }

    /// [`DataKey::seal_into`] with the nonce `counter`, reserved by [`DataKey::reserve`]: the
    /// writer reserves a group's nonces in order, then seals its lines on several threads.
    pub fn seal_into_at(&self, counter: u64, plain: &mut Vec<u8>, aad: &[u8], out: &mut Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[4..].copy_from_slice(&counter.to_be_bytes());
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), plain)
            .expect("AES-GCM sealing");
        // Key ids and base64 need no JSON escaping.
        out.extend_from_slice(b"{\"kid\":\"");
        out.extend_from_slice(self.kid.as_bytes());
        match &self.dkid {
            Some(dkid) => {
                out.extend_from_slice(b"\",\"dkid\":\"");
                out.extend_from_slice(dkid.as_bytes());
            }
            None => {
                out.extend_from_slice(b"\",\"dk\":\"");
                out.extend_from_slice(self.wrapped.as_bytes());
            }
        }
        out.extend_from_slice(b"\",\"n\":\"");
        append_b64(out, &nonce);
        out.extend_from_slice(b"\",\"ct\":\"");
        append_b64(out, plain);
        out.extend_from_slice(b"\"}");
    }

    /// The length of what [`DataKey::seal_into_at`] appends for a plaintext of `plain_len`
    /// bytes: the same fields, counted.
    pub fn sealed_unit_len(&self, plain_len: usize) -> usize {
        let b64 = |n: usize| base64::encoded_len(n, false).expect("sizes fit");
        let key_ref = match &self.dkid {
            Some(dkid) => "\",\"dkid\":\"".len() + dkid.len(),
            None => "\",\"dk\":\"".len() + self.wrapped.len(),
        };
        "{\"kid\":\"".len()
            + self.kid.len()
            + key_ref
            + "\",\"n\":\"".len()
            + b64(NONCE_LEN)
            + "\",\"ct\":\"".len()
            + b64(plain_len + AES_256_GCM.tag_len())
            + "\"}".len()
    }

    pub fn seal(&mut self, plain: &[u8], aad: &[u8]) -> SealedUnit {
        self.counter += 1;
        let mut nonce = [0u8; NONCE_LEN];
        nonce[4..].copy_from_slice(&self.counter.to_be_bytes());
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .expect("AES-GCM sealing");
        SealedUnit {
            kid: self.kid.clone(),
            dk: self.dkid.is_none().then(|| self.wrapped.clone()),
            dkid: self.dkid.clone(),
            n: B64.encode(nonce),
            ct: B64.encode(buf),
        }
    }
}

fn append_b64(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = out.len();
    let len = base64::encoded_len(bytes.len(), false).expect("sizes fit");
    out.resize(start + len, 0);
    B64.encode_slice(bytes, &mut out[start..])
        .expect("the buffer was sized for it");
}

/// What a sealed line or dead letter carries: the key id, the wrapped data key, the nonce and
/// the ciphertext (with its tag), base64 without padding.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SealedUnit {
    pub kid: String,
    /// The wrapped data key, inside a dead letter or an index text (and the lines of 0.x
    /// versions before data-keys); absent in a segment's lines, which name it by `dkid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dk: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkid: Option<String>,
    pub n: String,
    pub ct: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn group_bits_are_refused_except_in_systemds_credentials_folder() {
        let creds = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let in_creds = creds.path().join("staging.key");
        let outside = elsewhere.path().join("staging.key");
        std::fs::write(&in_creds, b"k").unwrap();
        std::fs::write(&outside, b"k").unwrap();
        let dir = Some(creds.path().as_os_str());
        // A 0440 credential (root's, the service reads it through an ACL) is taken...
        assert_eq!(0o440 & refused_mode_bits(&in_creds, dir), 0);
        // ...but not a file readable by others, nor the same mode anywhere else.
        assert_ne!(0o444 & refused_mode_bits(&in_creds, dir), 0);
        assert_ne!(0o440 & refused_mode_bits(&outside, dir), 0);
        assert_ne!(0o440 & refused_mode_bits(&in_creds, None), 0);
        // A path that only looks inside (`..`) is judged by where it leads.
        let sneaky = creds
            .path()
            .join("..")
            .join(elsewhere.path().file_name().unwrap())
            .join("staging.key");
        assert!(
            sneaky.exists(),
            "both folders are in the same temporary folder"
        );
        assert_ne!(0o440 & refused_mode_bits(&sneaky, dir), 0);
    }

    #[test]
    fn seals_and_opens_and_a_changed_byte_or_field_fails() {
        let ring = Keyring::generate();
        let mut dk = ring.new_data_key();
        let unit = dk.seal(b"patient", b"seq=1");
        assert_eq!(ring.open(&unit, b"seq=1").unwrap(), b"patient");
        assert!(matches!(
            ring.open(&unit, b"seq=2"),
            Err(KeyError::Damaged(_))
        ));
        let other = Keyring::generate();
        assert!(
            matches!(other.open(&unit, b"seq=1"), Err(KeyError::Missing(id)) if id == ring.current_id())
        );
    }

    #[test]
    fn hashes_survive_rotation_and_old_keys_still_open() {
        let mut ring = Keyring::generate();
        let h = ring.hash("MRN-1");
        let unit = ring.new_data_key().seal(b"x", b"");
        let old = ring.current_id().to_owned();
        let new = ring.rotate();
        assert_ne!(old, new);
        assert_eq!(ring.current_id(), new);
        assert_eq!(ring.hash("MRN-1"), h);
        assert_eq!(ring.open(&unit, b"").unwrap(), b"x");
        let sealed = ring.seal_text("HTTP 422: nome Ana");
        assert!(!sealed.contains("Ana"));
        assert_eq!(Keyring::reveal(Some(&ring), sealed), "HTTP 422: nome Ana");
    }
}
