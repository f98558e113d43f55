//! A throw-away public key infrastructure for TLS tests, made with the `openssl` command line
//! (Debian package openssl, installed by scripts/install-deps): a CA, server certificates for
//! loopback names, client certificates for certificate authentication, and a second CA that
//! signed none of them (the "wrong CA" case). Every file is written in the caller's folder,
//! keys mode 0600 (PostgreSQL and MariaDB refuse a key others can read).

use std::path::{Path, PathBuf};

/// A CA in a folder: `ca.pem` (certificate) and `ca.key`.
pub struct Pki {
    dir: PathBuf,
    name: String,
}

/// A certificate and its key, signed by a [`Pki`].
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("this test needs the openssl command line (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn private(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|err| panic!("chmod 600 {}: {err}", path.display()));
}

impl Pki {
    /// A new CA called `name` (files `{name}.pem`, `{name}.key`) in `dir`, valid two days.
    pub fn new(dir: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir).expect("creating the PKI folder");
        let (pem, key) = (format!("{name}.pem"), format!("{name}.key"));
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &pem,
                "-days",
                "2",
                "-subj",
                &format!("/CN=Estafeta test {name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        private(&dir.join(&key));
        Self {
            dir: dir.to_path_buf(),
            name: name.to_owned(),
        }
    }

    /// The CA certificate (PEM), for `sslrootcert`, `ssl-ca`, a CA file.
    pub fn ca(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// A server certificate `{file}.pem` / `{file}.key` for 127.0.0.1, ::1 and localhost.
    pub fn server(&self, file: &str) -> Pair {
        self.sign(
            file,
            "127.0.0.1",
            "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
    }

    /// A server certificate whose only name is `name` (for a name mismatch: `verify-ca`
    /// accepts it, `verify-full` refuses it).
    pub fn server_named(&self, file: &str, name: &str) -> Pair {
        self.sign(
            file,
            name,
            &format!("basicConstraints=CA:FALSE\nsubjectAltName=DNS:{name}\nextendedKeyUsage=serverAuth\n"),
        )
    }

    /// A client certificate with common name `user` (PostgreSQL's `cert` authentication maps
    /// the CN to the user; MariaDB's `REQUIRE SUBJECT` reads it).
    pub fn client(&self, file: &str, user: &str) -> Pair {
        self.sign(
            file,
            user,
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        )
    }

    fn sign(&self, file: &str, common_name: &str, extensions: &str) -> Pair {
        let (pem, key, csr, ext) = (
            format!("{file}.pem"),
            format!("{file}.key"),
            format!("{file}.csr"),
            format!("{file}.ext"),
        );
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={common_name}"),
            ],
        );
        std::fs::write(self.dir.join(&ext), extensions).expect("writing the extensions file");
        let (ca_pem, ca_key) = (format!("{}.pem", self.name), format!("{}.key", self.name));
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
        private(&self.dir.join(&key));
        Pair {
            cert: self.dir.join(pem),
            key: self.dir.join(key),
        }
    }
}
