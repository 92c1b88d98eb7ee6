//! A throwaway certificate authority for the tests' TLS servers (etcd members, the
//! OpenID provider): its certificate and the leaf certificates it signs, as PEM files.

use std::{
    fs,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

pub use rcgen::ExtendedKeyUsagePurpose as Usage;

/// A CA whose files go in one directory.
pub struct TestCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate, `dir/ca.pem`.
    pub cert: PathBuf,
}

impl TestCa {
    /// A new CA named after `id`, writing into `dir` (created).
    pub fn new(dir: &Path, id: &str) -> Self {
        fs::create_dir_all(dir).expect("tls directory");
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        valid(&mut params, &format!("sessiongate test CA {id}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = params.self_signed(&key).expect("CA certificate").pem();
        let cert = write(dir, "ca.pem", pem);
        Self {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
            cert,
        }
    }

    /// A certificate for `sans` (IP addresses or names), named `cn`, for `usages`:
    /// the files `{name}.pem` and `{name}-key.pem`.
    pub fn leaf(
        &self,
        name: &str,
        sans: Vec<String>,
        cn: &str,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(sans).expect("certificate params");
        valid(&mut params, cn);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign certificate");
        (
            write(&self.dir, &format!("{name}.pem"), cert.pem()),
            write(&self.dir, &format!("{name}-key.pem"), key.serialize_pem()),
        )
    }
}

/// Valid from yesterday for a month, named `cn`.
fn valid(params: &mut CertificateParams, cn: &str) {
    let now = time::OffsetDateTime::now_utc();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(30);
}

fn write(dir: &Path, name: &str, pem: String) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}
