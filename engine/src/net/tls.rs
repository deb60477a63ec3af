//! Certificates and TLS settings for the gossip transport.
//!
//! A cluster has one CA (`patina tls ca generate`). Each node gets a certificate signed by it
//! for its gossip IP (`patina tls server generate <ip>`), usable both to accept connections and
//! to open them: every connection is mutual TLS, and a peer whose certificate the CA did not
//! sign is refused during the handshake. `patina tls client generate` makes a client-only
//! certificate (tools that connect but never accept).
//!
//! Plaintext mode (`gossip.plaintext = true`, local development only) still runs TLS, because
//! QUIC requires it, but with a throwaway self-signed certificate and no verification.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Generating or signing a certificate failed.
    #[error("certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file could not be read or parsed.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("tls client verifier: {0}")]
    Verifier(String),
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct PemPair {
    /// The certificate.
    pub cert_pem: String,
    /// The PKCS#8 private key.
    pub key_pem: String,
}

/// The CA's parameters. Fixed, so the issuer can be rebuilt from the CA key alone: the subject
/// and the key identifier (derived from the key) come out the same.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Patina cluster CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Keys of the certificates `patina tls` makes: Ed25519, whose signatures are cheaper to make
/// and check than P-256's, and a full handshake between two nodes makes two and checks four
/// (see BENCHMARKS). Certificates with P-256 keys, as `patina tls` made them before, work as
/// well (keys in PKCS#8 files).
const CERT_KEY_ALGORITHM: &rcgen::SignatureAlgorithm = &rcgen::PKCS_ED25519;

/// A new cluster CA.
pub fn generate_ca() -> Result<PemPair, TlsError> {
    let key = KeyPair::generate_for(CERT_KEY_ALGORITHM)?;
    let cert = ca_params().self_signed(&key)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertUse {
    /// A node: accepts and opens connections.
    Node,
    /// A client: only opens connections.
    Client,
}

/// A certificate signed by the CA whose key is `ca_key_pem`, for the given names or IPs.
pub fn generate_signed(
    ca_key_pem: &str,
    names: &[String],
    usage: CertUse,
) -> Result<PemPair, TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut params = CertificateParams::new(names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        names
            .first()
            .cloned()
            .unwrap_or_else(|| "patina client".into()),
    );
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match usage {
        CertUse::Node => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        CertUse::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    let key = KeyPair::generate_for(CERT_KEY_ALGORITHM)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Certificates and key a node presents, and the CA it trusts.
#[derive(Debug, Clone)]
pub struct NodeTls {
    /// The node's certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key (PKCS#8 DER).
    pub key: Vec<u8>,
    /// The cluster CA.
    pub ca: CertificateDer<'static>,
    /// The name checked in a peer's certificate instead of its IP (`[gossip.tls] server_name`).
    pub server_name: Option<String>,
}

impl NodeTls {
    /// From PEM text.
    pub fn from_pem(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<NodeTls, TlsError> {
        let pem_err = |what: &str| {
            let what = what.to_owned();
            move |e: rustls::pki_types::pem::Error| TlsError::Pem {
                path: what.clone(),
                message: e.to_string(),
            }
        };
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err("certificate"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_err("key"))?;
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(pem_err("ca"))?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                path: "certificate".into(),
                message: "no certificate found".into(),
            });
        }
        Ok(NodeTls {
            chain,
            key: key.secret_der().to_vec(),
            ca,
            server_name: None,
        })
    }

    /// From the files named in `[gossip.tls]`.
    pub fn from_files(cert: &Path, key: &Path, ca: &Path) -> Result<NodeTls, TlsError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| TlsError::Pem {
                path: p.display().to_string(),
                message: e.to_string(),
            })
        };
        NodeTls::from_pem(&read(cert)?, &read(key)?, &read(ca)?)
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(Arc::new(roots))
    }

    /// Accepts only clients with a certificate signed by the CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key_der())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// Presents our certificate and accepts only servers signed by the CA.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key_der())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

/// Application protocol name, so a Patina endpoint never talks to anything else by accident.
pub const ALPN: &[u8] = b"patina/1";
/// The same protocol, with sealed datagrams beside QUIC ([`super::sealed`]): offered first
/// by a node that opens them, so two such nodes agree on it and any other pair on [`ALPN`].
pub const ALPN_SEALED: &[u8] = b"patina/2";
/// The protocol of nodes that open sealed datagrams and keep the keys of a connection closed
/// for idleness (the transport's kept keys): offered first by such a node, so two of them know
/// that both keep, and a pair with an older node negotiates [`ALPN_SEALED`].
pub const ALPN_SEALED_KEPT: &[u8] = b"patina/3";

/// ring's algorithms, with AES-128-GCM/SHA-256 first: SHA-256 runs on the CPU's SHA
/// instructions where SHA-384 (the default first suite's hash) runs in software, and a
/// handshake's key schedule hashes a lot (measured with `transport_cost`: see BENCHMARKS).
/// Both ends run this list, so every node-to-node connection uses the first suite.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(provider)
}

/// Plaintext mode: a throwaway self-signed certificate and no verification either way.
pub fn insecure_configs() -> Result<(rustls::ServerConfig, rustls::ClientConfig), TlsError> {
    let generated = rcgen::generate_simple_self_signed(vec!["patina".to_string()])?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        generated.signing_key.serialize_der(),
    ));
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![generated.cert.der().clone()], key)?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN.to_vec()];
    Ok((server, client))
}

/// Accepts any server certificate: only for `gossip.plaintext`.
#[derive(Debug)]
struct AcceptAnyServer;

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
