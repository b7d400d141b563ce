//! RSA certificates, for Cloud Foundry's servers when a client speaks TLS
//! 1.2 to them: their only 1.2 suites are ECDHE-RSA (cf-networking-helpers
//! `mutualtls`), so a P-256 server key leaves such a client nothing to agree
//! on. Same files as [`Pki`]'s own (`NAME.pem`, `NAME-key.pem` in its
//! directory), so its `ca()` and `identity()` name them.

use std::process::Command;

use crate::cluster::Pki;

/// A self-signed RSA CA `NAME.pem`, `NAME-key.pem` in `pki`'s directory.
pub(super) fn make_ca(pki: &Pki, name: &str, subject: &str) {
    let extensions = "basicConstraints = critical,CA:TRUE\n\
                      keyUsage = critical,keyCertSign,cRLSign\n\
                      subjectKeyIdentifier = hash\n";
    make(pki, name, subject, extensions, None);
}

/// An RSA certificate `NAME.pem` + `NAME-key.pem` for CN `cn` with the
/// extensions `ext` (`key=value` lines), signed by the CA `ca`.
pub(super) fn make_cert(pki: &Pki, name: &str, cn: &str, ext: &str, ca: &str) {
    let extensions = format!(
        "basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n{ext}"
    );
    make(pki, name, cn, &extensions, Some(ca));
}

/// One `openssl req -x509` (OpenSSL 3's `-CA` signs with a CA in the same
/// call) from a config naming the subject and the extensions.
fn make(pki: &Pki, name: &str, cn: &str, extensions: &str, ca: Option<&str>) {
    let config = format!("{name}.cnf");
    std::fs::write(
        pki.dir().join(&config),
        format!(
            "[req]\ndistinguished_name = subject\nprompt = no\nx509_extensions = extensions\n\
             [subject]\nCN = {cn}\n[extensions]\n{extensions}"
        ),
    )
    .expect("openssl config");
    let mut openssl = Command::new("openssl");
    openssl
        .args(["req", "-x509", "-config", &config, "-newkey", "rsa:2048", "-nodes", "-days", "2"])
        .args(["-keyout", &format!("{name}-key.pem"), "-out", &format!("{name}.pem")])
        .current_dir(pki.dir());
    if let Some(ca) = ca {
        openssl.args(["-CA", &format!("{ca}.pem"), "-CAkey", &format!("{ca}-key.pem")]);
    }
    let out = openssl.output().expect("run openssl (`cargo xtask setup` installs it)");
    assert!(out.status.success(), "openssl for {name}: {}", String::from_utf8_lossy(&out.stderr));
}
