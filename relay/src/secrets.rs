//! Secrets at rest (DESIGN.md, "Connection model": "the store keeps them encrypted (AEAD with a
//! key held outside the database)").
//!
//! Every secret of a stored connection definition — each place
//! [`ConnectionDefinition::secret_pointers`] lists — is sealed with XChaCha20-Poly1305
//! (RustCrypto `chacha20poly1305`; 256-bit key, a random 192-bit nonce per value, so nonces never
//! need a counter) under the relay's [`MasterKey`], and stored in place of the plaintext as
//!
//! ```json
//! {"enc": "v1:<base64(nonce || ciphertext || tag)>"}
//! ```
//!
//! The associated data binds each ciphertext to its connection name and JSON pointer (RFC 6901),
//! so a sealed value cannot be moved to another field or another connection: it would fail to
//! open. The rest of the definition stays readable JSON, and the `connections.definition` column
//! stays `TEXT`: no schema migration. Rows written before encryption existed hold plain strings;
//! they are read as they are and sealed by [`crate::store::Store::seal_stored_secrets`] at
//! startup.
//!
//! # The master key
//!
//! 32 random bytes, written as standard base64 (RFC 4648 §4; padding optional, surrounding
//! whitespace ignored), e.g. from `head -c 32 /dev/urandom | base64`. The relay takes it from
//! `AIRLOCK_MASTER_KEY`, or from the file named by `--master-key-file`, or else from
//! `<data-dir>/master-key`, which it generates (mode 0600) on first start. The key never goes
//! into the database: a copy of the database alone does not reveal a secret. Losing the key loses
//! the secrets; a relay given another key refuses to start ([`crate::store::StoreError::Decrypt`]
//! names the connection, never the value).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use airlock_shared::model::{pointer_token, ConnectionDefinition};
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde_json::Value;

/// Name of the generated master key file in the data directory.
pub const MASTER_KEY_FILE: &str = "master-key";

/// Length of the master key: 32 bytes (256 bits).
pub const KEY_LEN: usize = 32;

/// Length of an XChaCha20-Poly1305 nonce: 24 bytes.
const NONCE_LEN: usize = 24;

/// Length of the Poly1305 tag: 16 bytes.
const TAG_LEN: usize = 16;

/// The key of the marker object a sealed value is stored in.
pub const SEALED_KEY: &str = "enc";

/// Version prefix of a sealed value; a future format (another AEAD, a key id) gets `v2:`.
pub const SEALED_PREFIX: &str = "v1:";

/// Domain separation for the associated data.
const AAD_CONTEXT: &[u8] = b"airlock connection secret v1\0";

/// Base64 that accepts input with or without `=` padding.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The relay's 256-bit master key. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterKey([u8; KEY_LEN]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(***)")
    }
}

/// A master key could not be read or made.
///
/// Messages never contain key material: they name where the key came from and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The text is not the base64 of exactly 32 bytes.
    #[error("{origin}: {message}")]
    Format {
        /// Where the key came from (`AIRLOCK_MASTER_KEY`, a file path).
        origin: String,
        /// What is wrong, without the value.
        message: String,
    },
    /// Reading or writing the key file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

impl MasterKey {
    /// A new random key from the operating system's CSPRNG.
    pub fn generate() -> MasterKey {
        let key = XChaCha20Poly1305::generate_key(&mut OsRng);
        let mut bytes = [0u8; KEY_LEN];
        bytes.copy_from_slice(&key);
        MasterKey(bytes)
    }

    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> MasterKey {
        MasterKey(bytes)
    }

    /// Parses the base64 of 32 bytes (standard alphabet, padding optional, surrounding whitespace
    /// ignored). `origin` names the source in errors.
    ///
    /// # Errors
    /// [`KeyError::Format`] when the text is not base64 or does not decode to 32 bytes; the
    /// message never quotes the text.
    pub fn from_base64(text: &str, origin: &str) -> Result<MasterKey, KeyError> {
        let format = |message: String| KeyError::Format {
            origin: origin.to_owned(),
            message,
        };
        let text = text.trim();
        if text.is_empty() {
            return Err(format(
                "is empty; expected the base64 of 32 random bytes \
                 (e.g. `head -c 32 /dev/urandom | base64`)"
                    .into(),
            ));
        }
        let bytes = LENIENT_BASE64.decode(text).map_err(|_| {
            format(
                "is not base64; expected the base64 of 32 random bytes \
                 (e.g. `head -c 32 /dev/urandom | base64`)"
                    .into(),
            )
        })?;
        let bytes: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
            format(format!(
                "decodes to {} bytes; the master key is exactly {KEY_LEN} bytes (256 bits)",
                bytes.len()
            ))
        })?;
        Ok(MasterKey(bytes))
    }

    /// The key as standard base64 with padding (44 characters), the format of the key file.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Reads a key file: the base64 of 32 bytes, optionally followed by a newline.
    ///
    /// Logs a warning when the file is readable by its group or others.
    ///
    /// # Errors
    /// [`KeyError::Io`] when the file cannot be read, [`KeyError::Format`] naming the file.
    pub fn read_file(path: &Path) -> Result<MasterKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })?;
        warn_if_shared(path);
        MasterKey::from_base64(&text, &path.display().to_string())
    }

    /// The key in `path`, generating it first (mode 0600) when the file does not exist. Returns
    /// the key and whether it was generated now.
    ///
    /// The new file appears atomically with its full content (written to a temporary file, then
    /// linked into place without replacing anything), so two relays starting at once agree on
    /// one key and a crash never leaves a half-written key.
    ///
    /// # Errors
    /// [`KeyError::Io`] when the file cannot be read or written, [`KeyError::Format`] when an
    /// existing file does not hold a key.
    pub fn load_or_create(path: &Path) -> Result<(MasterKey, bool), KeyError> {
        match MasterKey::read_file(path) {
            Ok(key) => return Ok((key, false)),
            Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let key = MasterKey::generate();
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_file_name(format!(
            ".{MASTER_KEY_FILE}.{}.{}.tmp",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        write_private_new(&tmp, &format!("{}\n", key.to_base64())).map_err(io)?;
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok((key, true)),
            // Another relay won the race: use its key.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok((MasterKey::read_file(path)?, false))
            }
            Err(e) => Err(io(e)),
        }
    }
}

/// Creates `path` (which must not exist) with mode 0600, writes `contents` and syncs it.
fn write_private_new(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

#[cfg(unix)]
fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "the master key file is readable by other users; chmod 600 it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_shared(_path: &Path) {}

/// A sealed value could not be opened: wrong master key, or the stored value was altered or
/// moved. Names the field, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decrypt the secret at {pointer}: {reason}")]
pub struct OpenError {
    /// JSON pointer of the field in the definition.
    pub pointer: String,
    /// What failed (`wrong master key or altered value`, `not base64`, …).
    pub reason: &'static str,
}

/// Seals and opens connection secrets under one [`MasterKey`]. Cheap to share behind an `Arc`.
#[derive(Clone)]
pub struct SecretCipher {
    aead: XChaCha20Poly1305,
}

impl std::fmt::Debug for SecretCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretCipher(XChaCha20-Poly1305)")
    }
}

/// The associated data of the secret at `pointer` of connection `connection`: a context string,
/// the name's length (u32, big-endian) and bytes, then the pointer. The length prefix keeps
/// `("a", "/b")` and `("a/", "b")`-style splits apart.
fn associated_data(connection: &str, pointer: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_CONTEXT.len() + 4 + connection.len() + pointer.len());
    aad.extend_from_slice(AAD_CONTEXT);
    // Connection names are at most 64 bytes (`valid_name`); saturate rather than panic anyway.
    let len = u32::try_from(connection.len()).unwrap_or(u32::MAX);
    aad.extend_from_slice(&len.to_be_bytes());
    aad.extend_from_slice(connection.as_bytes());
    aad.extend_from_slice(pointer.as_bytes());
    aad
}

impl SecretCipher {
    /// A cipher under `key`.
    pub fn new(key: &MasterKey) -> SecretCipher {
        SecretCipher {
            aead: XChaCha20Poly1305::new((&key.0).into()),
        }
    }

    /// Seals `plaintext`, the secret at `pointer` of connection `connection`: returns
    /// `v1:<base64(nonce || ciphertext || tag)>` with a fresh random nonce.
    pub fn seal(&self, connection: &str, pointer: &str, plaintext: &str) -> String {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = associated_data(connection, pointer);
        let ciphertext = self
            .aead
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: &aad,
                },
            )
            // Encryption fails only for messages over 256 GiB; a request body is at most 1 MiB.
            .unwrap_or_default();
        let mut sealed = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        format!("{SEALED_PREFIX}{}", STANDARD.encode(sealed))
    }

    /// Opens a value made by [`seal`](Self::seal) for the same connection and pointer.
    ///
    /// # Errors
    /// [`OpenError`] naming `pointer` when the value is not `v1:` base64, is too short, or fails
    /// authentication (another key, another field or connection, or altered bytes).
    pub fn open(&self, connection: &str, pointer: &str, sealed: &str) -> Result<String, OpenError> {
        let fail = |reason| OpenError {
            pointer: pointer.to_owned(),
            reason,
        };
        let encoded = sealed
            .strip_prefix(SEALED_PREFIX)
            .ok_or_else(|| fail("unknown format (expected v1:)"))?;
        let bytes = STANDARD
            .decode(encoded)
            .map_err(|_| fail("the sealed value is not base64"))?;
        if bytes.len() < NONCE_LEN + TAG_LEN {
            return Err(fail("the sealed value is too short"));
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let aad = associated_data(connection, pointer);
        let plaintext = self
            .aead
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| fail("wrong master key, or the stored value was altered or moved"))?;
        String::from_utf8(plaintext).map_err(|_| fail("the decrypted secret is not UTF-8"))
    }

    /// The JSON to store for `definition`: its serialization with the string at every
    /// [`ConnectionDefinition::secret_pointers`] replaced by `{"enc": "v1:…"}`.
    ///
    /// # Errors
    /// When the definition cannot be serialized (not expected: every field is plain data).
    pub fn seal_definition(&self, definition: &ConnectionDefinition) -> serde_json::Result<Value> {
        let mut value = serde_json::to_value(definition)?;
        for pointer in definition.secret_pointers() {
            if let Some(slot) = value.pointer_mut(&pointer) {
                if let Value::String(plaintext) = slot {
                    let sealed = self.seal(&definition.name, &pointer, plaintext);
                    *slot = sealed_marker(sealed);
                }
            }
        }
        Ok(value)
    }

    /// Opens every sealed value (`{"enc": "v1:…"}`, wherever it is) in the stored JSON of
    /// connection `connection`, in place; plain strings stay as they are. Returns how many
    /// values were opened.
    ///
    /// Sealed values are found by their shape, not through
    /// [`ConnectionDefinition::secret_pointers`], so a value sealed by a relay that counted more
    /// fields as secret still opens.
    ///
    /// # Errors
    /// The first [`OpenError`]; `value` is then partly opened and must be dropped.
    pub fn open_value(&self, connection: &str, value: &mut Value) -> Result<usize, OpenError> {
        let mut pointer = String::new();
        let mut opened = 0;
        self.open_at(connection, value, &mut pointer, &mut opened)?;
        Ok(opened)
    }

    fn open_at(
        &self,
        connection: &str,
        value: &mut Value,
        pointer: &mut String,
        opened: &mut usize,
    ) -> Result<(), OpenError> {
        if let Some(sealed) = sealed_text(value) {
            let plaintext = self.open(connection, pointer, sealed)?;
            *value = Value::String(plaintext);
            *opened += 1;
            return Ok(());
        }
        let len = pointer.len();
        match value {
            Value::Object(map) => {
                for (key, child) in map.iter_mut() {
                    pointer.push('/');
                    pointer.push_str(&pointer_token(key));
                    self.open_at(connection, child, pointer, opened)?;
                    pointer.truncate(len);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter_mut().enumerate() {
                    pointer.push('/');
                    pointer.push_str(&i.to_string());
                    self.open_at(connection, child, pointer, opened)?;
                    pointer.truncate(len);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// `{"enc": sealed}`.
fn sealed_marker(sealed: String) -> Value {
    let mut map = serde_json::Map::new();
    map.insert(SEALED_KEY.to_owned(), Value::String(sealed));
    Value::Object(map)
}

/// The sealed text when `value` is a sealed marker: an object whose only member is `"enc"`, a
/// string starting with `v1:`.
fn sealed_text(value: &Value) -> Option<&str> {
    match value {
        Value::Object(map) if map.len() == 1 => map
            .get(SEALED_KEY)
            .and_then(Value::as_str)
            .filter(|s| s.starts_with(SEALED_PREFIX)),
        _ => None,
    }
}

/// True when some [`ConnectionDefinition::secret_pointers`] field of the stored JSON `value`
/// holds a plain (unsealed, non-empty) string: a row from before encryption, to be sealed.
pub fn has_plaintext_secret(definition: &ConnectionDefinition, stored: &Value) -> bool {
    definition
        .secret_pointers()
        .iter()
        .any(|p| stored.pointer(p).and_then(Value::as_str).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PASSWORD: &str = "correct horse battery staple ünïcødé";

    fn cipher() -> SecretCipher {
        SecretCipher::new(&MasterKey::generate())
    }

    fn definition(name: &str) -> ConnectionDefinition {
        serde_json::from_value(json!({
            "name": name,
            "base_url": "https://jira.example",
            "auth": {"type": "basic", "username": "svc", "password": PASSWORD},
        }))
        .unwrap()
    }

    #[test]
    fn seal_and_open_round_trip() {
        let c = cipher();
        let sealed = c.seal("jira", "/auth/password", PASSWORD);
        assert!(sealed.starts_with("v1:"), "{sealed}");
        assert!(!sealed.contains(PASSWORD));
        assert_eq!(c.open("jira", "/auth/password", &sealed).unwrap(), PASSWORD);
        // A fresh nonce every time: the same plaintext never seals the same way.
        assert_ne!(sealed, c.seal("jira", "/auth/password", PASSWORD));
        // The empty string round-trips too.
        let empty = c.seal("jira", "/auth/password", "");
        assert_eq!(c.open("jira", "/auth/password", &empty).unwrap(), "");
    }

    #[test]
    fn ciphertexts_are_bound_to_key_connection_and_field() {
        let c = cipher();
        let sealed = c.seal("jira", "/auth/password", PASSWORD);
        let wrong_key = cipher()
            .open("jira", "/auth/password", &sealed)
            .unwrap_err();
        assert_eq!(wrong_key.pointer, "/auth/password");
        assert!(
            wrong_key.to_string().contains("wrong master key"),
            "{wrong_key}"
        );
        assert!(c.open("other", "/auth/password", &sealed).is_err());
        assert!(c.open("jira", "/tls/client_key", &sealed).is_err());
        // Length-prefixed name: shifting a character between name and pointer fails.
        let s = c.seal("a", "/b/c", "x");
        assert!(c.open("a/b", "/c", &s).is_err());
        // A flipped bit fails.
        let mut bytes = STANDARD.decode(&sealed[3..]).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let tampered = format!("v1:{}", STANDARD.encode(bytes));
        assert!(c.open("jira", "/auth/password", &tampered).is_err());
        // Garbage is an error, never a panic.
        for bad in ["v1:", "v1:!!", "v2:AAAA", "v1:AAAA", ""] {
            let e = c.open("jira", "/auth/password", bad).unwrap_err();
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn definitions_are_sealed_at_every_secret_pointer() {
        let c = cipher();
        let d = definition("jira");
        let mut stored = c.seal_definition(&d).unwrap();
        let text = stored.to_string();
        assert!(!text.contains(PASSWORD), "{text}");
        assert!(!text.contains("horse"), "{text}");
        assert_eq!(stored["auth"]["username"], "svc");
        assert_eq!(stored["base_url"], "https://jira.example/");
        let sealed = stored["auth"]["password"]["enc"].as_str().unwrap();
        assert!(sealed.starts_with("v1:"));
        assert!(!has_plaintext_secret(&d, &stored));
        assert!(has_plaintext_secret(&d, &serde_json::to_value(&d).unwrap()));

        assert_eq!(c.open_value("jira", &mut stored).unwrap(), 1);
        let back: ConnectionDefinition = serde_json::from_value(stored).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn every_auth_type_and_the_client_key_are_sealed() {
        let c = cipher();
        let d: ConnectionDefinition = serde_json::from_value(json!({
            "name": "all",
            "base_url": "https://app.example",
            "auth": {
                "type": "custom", "username": "u", "password": "s-password",
                "headers": [
                    {"name": "X-Key", "value": "s-header"},
                    {"name": "X-Tenant", "value": "visible-tenant", "secret": false},
                ],
                "params": {"a/b~c": "s-param"},
            },
            "tls": {"client_certificate": "CERT-PEM", "client_key": "s-client-key"},
        }))
        .unwrap();
        let mut stored = c.seal_definition(&d).unwrap();
        let text = stored.to_string();
        assert!(!text.contains("s-"), "{text}");
        for pointer in [
            "/auth/password",
            "/auth/headers/0/value",
            "/auth/params/a~1b~0c",
            "/tls/client_key",
        ] {
            let sealed = stored.pointer(pointer).unwrap();
            assert!(sealed_text(sealed).is_some(), "{pointer}: {sealed}");
        }
        // Values that are not secret stay readable.
        assert_eq!(stored["auth"]["headers"][1]["value"], "visible-tenant");
        assert_eq!(stored["tls"]["client_certificate"], "CERT-PEM");
        assert_eq!(c.open_value("all", &mut stored).unwrap(), 4);
        assert_eq!(
            serde_json::from_value::<ConnectionDefinition>(stored).unwrap(),
            d
        );
    }

    #[test]
    fn sealed_values_cannot_be_swapped_between_connections() {
        let c = cipher();
        let a = c.seal_definition(&definition("a")).unwrap();
        let mut b = c.seal_definition(&definition("b")).unwrap();
        b["auth"]["password"] = a["auth"]["password"].clone();
        let e = c.open_value("b", &mut b).unwrap_err();
        assert_eq!(e.pointer, "/auth/password");
    }

    #[test]
    fn open_finds_markers_anywhere_and_leaves_plain_values() {
        let c = cipher();
        let mut value = json!({
            "auth": {"params": {"a/b~c": {"enc": c.seal("x", "/auth/params/a~1b~0c", "k1")}},
                     "headers": [{"name": "h", "value": {"enc": c.seal("x", "/auth/headers/0/value", "k2")}}]},
            "plain": "v1:not-sealed",
            "other": {"enc": "not-v1"},
            "two": {"enc": "v1:x", "more": 1},
        });
        assert_eq!(c.open_value("x", &mut value).unwrap(), 2);
        assert_eq!(value["auth"]["params"]["a/b~c"], "k1");
        assert_eq!(value["auth"]["headers"][0]["value"], "k2");
        assert_eq!(value["plain"], "v1:not-sealed");
        assert_eq!(value["other"], json!({"enc": "not-v1"}));
    }

    #[test]
    fn master_key_base64() {
        let key = MasterKey::generate();
        let text = key.to_base64();
        assert_eq!(text.len(), 44);
        assert_eq!(MasterKey::from_base64(&text, "t").unwrap(), key);
        assert_eq!(
            MasterKey::from_base64(&format!("  {}\n", text.trim_end_matches('=')), "t").unwrap(),
            key
        );
        assert_ne!(MasterKey::generate(), key);
        assert_eq!(format!("{key:?}"), "MasterKey(***)");

        let short = STANDARD.encode([7u8; 16]);
        let e = MasterKey::from_base64(&short, "AIRLOCK_MASTER_KEY").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("AIRLOCK_MASTER_KEY: decodes to 16 bytes"),
            "{msg}"
        );
        assert!(!msg.contains(&short));
        for bad in ["", "not base64 at all!", "hunter2"] {
            let e = MasterKey::from_base64(bad, "K").unwrap_err().to_string();
            assert!(e.starts_with("K: "), "{e}");
            if !bad.is_empty() {
                assert!(!e.contains(bad), "{e}");
            }
        }
    }

    #[test]
    fn key_file_is_generated_once_with_mode_0600() {
        let dir = std::env::temp_dir().join(format!(
            "airlock-secrets-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(MASTER_KEY_FILE);
        let (key, created) = MasterKey::load_or_create(&path).unwrap();
        assert!(created);
        let (again, created) = MasterKey::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(key, again);
        assert_eq!(MasterKey::read_file(&path).unwrap(), key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(MASTER_KEY_FILE)]);
        // A file that holds no key is an error naming the file, never replaced.
        std::fs::write(&path, "garbage").unwrap();
        let e = MasterKey::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains(MASTER_KEY_FILE), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "garbage");
        let e = MasterKey::read_file(&dir.join("missing")).unwrap_err();
        assert!(matches!(e, KeyError::Io { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
