//! TLS and mutual TLS: a node serving TLS answers the CLI that trusts its CA and refuses
//! everyone else (no CA, plain text); a node requiring client certificates refuses a
//! client without one or with one from another CA, and accepts one signed by its CA, while
//! the caller is still whoever its token says; nodes gossip soft counts over mTLS; the
//! aggregator reads a spool over mTLS; bad PEM files stop `allot serve` with the option and
//! the file named. Certificates are made here, at test time.

mod harness;

use std::path::{Path, PathBuf};
use std::time::Duration;

use allot_proto::v1 as pb;
use enforcer::auth::TokenFile;
use enforcer::tls::Pem;
use harness::{record, subscribe, Node};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::transport::ClientTlsConfig;

/// A CA, and the certificates it signs, written as PEM files into a temporary directory.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate.
    cert: PathBuf,
    dir: PathBuf,
}

/// A certificate and its key, as files.
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let cert = dir.join(format!("{name}.pem"));
        std::fs::write(&cert, issuer.pem()).unwrap();
        Ca {
            issuer,
            cert,
            dir: dir.to_path_buf(),
        }
    }

    /// A certificate for `names` (DNS names or IP addresses) with these extended key
    /// usages, as the docs tell operators to make them.
    fn sign(&self, file: &str, names: &[&str], usages: &[ExtendedKeyUsagePurpose]) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = usages.to_vec();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let leaf = Leaf {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&leaf.cert, cert.pem()).unwrap();
        std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
        leaf
    }

    /// A node's certificate: for 127.0.0.1 and localhost, server and client use (it is
    /// also the node's client certificate towards its peers).
    fn node(&self, file: &str) -> Leaf {
        use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        self.sign(file, &["127.0.0.1", "localhost"], &[ServerAuth, ClientAuth])
    }

    /// A client's certificate.
    fn client(&self, file: &str) -> Leaf {
        self.sign(file, &[], &[ExtendedKeyUsagePurpose::ClientAuth])
    }

    /// How the harness dials a node signed by this CA, presenting `client` if given.
    fn dial(&self, client: Option<&Leaf>) -> ClientTlsConfig {
        let ca = Pem::new("--tls-ca", &self.cert);
        let id = client.map(|c| {
            (
                Pem::new("--tls-client-cert", &c.cert),
                Pem::new("--tls-client-key", &c.key),
            )
        });
        enforcer::tls::client_config(Some(&ca), id.as_ref().map(|(c, k)| (c, k))).unwrap()
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `allot serve` options for TLS with `leaf`, and mTLS with `client_ca`.
fn serve_tls(b: harness::NodeBuilder, leaf: &Leaf, client_ca: Option<&Ca>) -> harness::NodeBuilder {
    let b = b
        .arg("--tls-cert")
        .arg(path(&leaf.cert))
        .arg("--tls-key")
        .arg(path(&leaf.key));
    match client_ca {
        Some(ca) => b.arg("--tls-client-ca").arg(path(&ca.cert)),
        None => b,
    }
}

const OK: i32 = 0;

#[tokio::test]
async fn a_tls_node_answers_clients_that_trust_its_ca_and_no_one_else() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let leaf = ca.node("node");
    let data = dir.path().join("data");
    let token = TokenFile::add(
        &data.join("tokens.toml"),
        "ada@example.com",
        &["admin".into()],
    )
    .unwrap();
    let node = serve_tls(Node::builder().with_auth().data_dir(&data), &leaf, None)
        .client_tls(ca.dial(None))
        .start()
        .await;
    assert!(node.endpoint.starts_with("https://"), "{}", node.endpoint);
    let ca_file = path(&ca.cert);

    // With the CA and a token: served, and the actor is the token's principal.
    let r = node
        .cli(&[
            "--tls-ca",
            ca_file,
            "--token",
            &token,
            "subscribe",
            "--tenant",
            "acme",
            "--plan",
            "free",
        ])
        .await;
    assert_eq!(r.0, OK, "{r:?}");
    assert!(r.1.contains("free@1"), "{r:?}");
    let r = node
        .cli(&[
            "--tls-ca", ca_file, "--token", &token, "--json", "tenant", "history", "acme",
        ])
        .await;
    assert_eq!(r.0, OK, "{r:?}");
    assert!(r.1.contains("ada@example.com"), "{r:?}");

    // TLS does not replace the token.
    let r = node
        .cli(&["--tls-ca", ca_file, "tenant", "show", "acme"])
        .await;
    assert_ne!(r.0, OK, "{r:?}");
    assert!(r.2.contains("unauthenticated"), "{r:?}");

    // A bare host:port with a --tls-* option is https.
    let r = node
        .cli(&[
            "--endpoint",
            &node.addr,
            "--tls-ca",
            ca_file,
            "--token",
            &token,
            "tenant",
            "show",
            "acme",
        ])
        .await;
    assert_eq!(r.0, OK, "{r:?}");

    // Without the CA (the system's roots do not have it): refused, and the hint names
    // --tls-ca.
    let r = node
        .cli(&["--token", &token, "tenant", "show", "acme"])
        .await;
    assert_ne!(r.0, OK, "{r:?}");
    assert!(r.2.contains("cannot reach allot node at https://"), "{r:?}");
    assert!(r.2.contains("UnknownIssuer"), "{r:?}");
    assert!(r.2.contains("--tls-ca"), "{r:?}");

    // Another CA: refused the same way.
    let other = Ca::new(dir.path(), "other-ca");
    let r = node
        .cli(&[
            "--tls-ca",
            path(&other.cert),
            "--token",
            &token,
            "tenant",
            "show",
            "acme",
        ])
        .await;
    assert_ne!(r.0, OK, "{r:?}");
    assert!(r.2.contains("UnknownIssuer"), "{r:?}");

    // Plain text to a TLS node: refused, pointing at https.
    let plain = format!("http://{}", node.addr);
    let r = node
        .cli(&[
            "--endpoint",
            &plain,
            "--token",
            &token,
            "tenant",
            "show",
            "acme",
        ])
        .await;
    assert_ne!(r.0, OK, "{r:?}");
    assert!(r.2.contains(&plain), "{r:?}");
    assert!(
        r.2.contains("if it serves TLS, did you use https://"),
        "{r:?}"
    );
    assert!(!r.1.contains("free@1"), "{r:?}");

    // TLS options with an http:// endpoint are a mistake, said so.
    let r = node
        .cli(&[
            "--endpoint",
            &plain,
            "--tls-ca",
            ca_file,
            "tenant",
            "show",
            "acme",
        ])
        .await;
    assert_ne!(r.0, OK, "{r:?}");
    assert!(r.2.contains("is not https://"), "{r:?}");
}

#[tokio::test]
async fn an_mtls_node_wants_a_client_certificate_from_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let other = Ca::new(dir.path(), "other-ca");
    let leaf = ca.node("node");
    let good = ca.client("good-client");
    let stranger = other.client("stranger");
    let data = dir.path().join("data");
    let token = TokenFile::add(
        &data.join("tokens.toml"),
        "support@example.com",
        &["support:read".into()],
    )
    .unwrap();
    let node = serve_tls(
        Node::builder().with_auth().data_dir(&data),
        &leaf,
        Some(&ca),
    )
    .client_tls(ca.dial(Some(&good)))
    .start()
    .await;
    let ca_file = path(&ca.cert);
    let show = ["tenant", "show", "nobody"];
    fn with_cert<'a>(base: &[&'a str], cert: Option<&'a Leaf>, tail: &[&'a str]) -> Vec<&'a str> {
        let mut args = base.to_vec();
        if let Some(c) = cert {
            args.extend([
                "--tls-client-cert",
                path(&c.cert),
                "--tls-client-key",
                path(&c.key),
            ]);
        }
        args.extend(tail);
        args
    }
    let base = ["--tls-ca", ca_file, "--token", token.as_str()];

    // No client certificate: the handshake is refused (TLS 1.3 says so on the first
    // call, after the client thinks it is connected).
    let r = node.cli(&with_cert(&base, None, &show)).await;
    assert_ne!(r.0, OK, "{r:?}");
    assert!(
        r.2.contains("cannot reach allot node at https://")
            && r.2.contains("does the node require a client certificate"),
        "the error says a certificate is wanted: {r:?}"
    );
    assert!(!r.2.contains("unknown tenant"), "{r:?}");

    // A certificate from another CA: refused.
    let r = node.cli(&with_cert(&base, Some(&stranger), &show)).await;
    assert_ne!(r.0, OK, "{r:?}");
    assert!(
        r.2.contains("does the node require a client certificate"),
        "{r:?}"
    );
    assert!(!r.2.contains("unknown tenant"), "{r:?}");

    // Signed by the CA: the call reaches the node, which answers (the tenant is unknown).
    let r = node.cli(&with_cert(&base, Some(&good), &show)).await;
    assert!(r.2.contains("unknown tenant"), "{r:?}");

    // The certificate is not a principal: without a token the call is refused, and with
    // the support token an admin call is not allowed.
    let r = node
        .cli(&[
            "--tls-ca",
            ca_file,
            "--tls-client-cert",
            path(&good.cert),
            "--tls-client-key",
            path(&good.key),
            "tenant",
            "show",
            "nobody",
        ])
        .await;
    assert!(r.2.contains("unauthenticated"), "{r:?}");
    let subscribe = ["subscribe", "--tenant", "acme", "--plan", "free"];
    let r = node.cli(&with_cert(&base, Some(&good), &subscribe)).await;
    assert!(r.2.contains("permission denied"), "{r:?}");

    // A half-given client identity is refused before dialing.
    let r = node
        .cli(&[
            "--tls-ca",
            ca_file,
            "--tls-client-cert",
            path(&good.cert),
            "tenant",
            "show",
            "nobody",
        ])
        .await;
    assert!(
        r.2.contains("--tls-client-cert needs --tls-client-key"),
        "{r:?}"
    );
}

const SOFT_CATALOG: &str = "version: 1
metrics:
  calls: { unit: call }
plans:
  open:
    versions:
      1:
        limits:
          calls:
            - { window: day, amount: 10000, enforcement: soft }
";

/// The day window's usage of `calls` as `node` sees it.
async fn calls_seen(node: &Node, tenant: &str) -> u64 {
    harness::window_usage(&mut node.enforcer().await, tenant, "calls", "day")
        .await
        .0
}

/// Waits until `node` sees `want` calls of `tenant`; panics with what it saw after 30 s.
async fn wait_calls(node: &Node, tenant: &str, want: u64) {
    let mut seen = 0;
    for _ in 0..300 {
        seen = calls_seen(node, tenant).await;
        if seen == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} saw {seen} calls of {tenant}, not {want}", node.endpoint);
}

#[tokio::test]
async fn nodes_gossip_soft_counts_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let (leaf_a, leaf_b) = (ca.node("node-a"), ca.node("node-b"));
    let admin = ca.client("admin");
    let start = |leaf: &Leaf, id: &str, peers: Option<&str>| {
        let mut b = serve_tls(Node::builder().catalog(SOFT_CATALOG), leaf, Some(&ca))
            .client_tls(ca.dial(Some(&admin)))
            .arg("--node-id")
            .arg(id)
            .arg("--sync-interval")
            .arg("100ms");
        if let Some(p) = peers {
            b = b.arg("--peers").arg(p);
        }
        b.start()
    };
    // b names a; a learns b when b first pushes, and dials it back.
    let a = start(&leaf_a, "a", None).await;
    let b = start(&leaf_b, "b", Some(&a.addr)).await;
    // Embedded nodes: each has its own subscriptions; only soft counts are shared.
    subscribe(&mut a.admin().await, "acme", "open").await;
    subscribe(&mut b.admin().await, "acme", "open").await;

    a.enforcer()
        .await
        .record(record("acme", "calls", 7, "a-1"))
        .await
        .unwrap();
    b.enforcer()
        .await
        .record(record("acme", "calls", 5, "b-1"))
        .await
        .unwrap();
    // Each node's count reaches the other only over the peer streams, which are TLS both
    // ways with the node's certificate as client certificate.
    wait_calls(&a, "acme", 12).await;
    wait_calls(&b, "acme", 12).await;

    for node in [&a, &b] {
        let peers = node
            .admin()
            .await
            .get_peers(pb::GetPeersRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(peers.peers.len(), 1, "{peers:?}");
        assert!(peers.peers[0].live, "{peers:?}");
    }
}

#[tokio::test]
async fn a_peer_without_a_certificate_from_the_ca_is_not_heard() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let other = Ca::new(dir.path(), "other-ca");
    let admin = ca.client("admin");
    let a = serve_tls(
        Node::builder().catalog(SOFT_CATALOG),
        &ca.node("node-a"),
        Some(&ca),
    )
    .client_tls(ca.dial(Some(&admin)))
    .arg("--node-id")
    .arg("a")
    .start()
    .await;
    // An intruder: its certificate is from another CA; it trusts a's CA to dial a.
    let intruder_admin = other.client("intruder-admin");
    let intruder = serve_tls(
        Node::builder().catalog(SOFT_CATALOG),
        &other.node("intruder"),
        Some(&other),
    )
    .client_tls(other.dial(Some(&intruder_admin)))
    .arg("--node-id")
    .arg("intruder")
    .arg("--tls-peer-ca")
    .arg(path(&ca.cert))
    .arg("--peers")
    .arg(&a.addr)
    .start()
    .await;
    subscribe(&mut intruder.admin().await, "acme", "open").await;
    intruder
        .enforcer()
        .await
        .record(record("acme", "calls", 9, "i-1"))
        .await
        .unwrap();
    // The intruder keeps trying to push; wait until it has tried and recorded why it failed.
    let mut error = String::new();
    for _ in 0..300 {
        let p = intruder
            .admin()
            .await
            .get_peers(pb::GetPeersRequest {})
            .await
            .unwrap()
            .into_inner();
        if let Some(e) = p.peers.first().map(|p| p.error.clone()) {
            if !e.is_empty() {
                error = e;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Refused in the handshake: a does not know the intruder's CA. In TLS 1.3 the
    // intruder learns it as an alert or as a closed connection, whichever it reads first.
    assert!(
        ["UnknownCA", "closed", "broken pipe", "reset"]
            .iter()
            .any(|w| error.contains(w)),
        "the intruder's push fails on its certificate: {error:?}"
    );
    let p = a
        .admin()
        .await
        .get_peers(pb::GetPeersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(p.peers.is_empty(), "a never heard the intruder: {p:?}");
}

#[tokio::test]
async fn the_aggregator_reads_a_spool_over_mutual_tls() {
    use aggregator::source::Source;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let reader = ca.client("aggregator");
    let node = serve_tls(Node::builder(), &ca.node("node"), Some(&ca))
        .client_tls(ca.dial(Some(&reader)))
        .start()
        .await;
    subscribe(&mut node.admin().await, "acme", "free").await;
    node.enforcer()
        .await
        .record(record("acme", "api_calls", 3, "e-1"))
        .await
        .unwrap();
    // No ClickHouse is contacted: reading the spool needs only the node.
    let sink = aggregator::sink::ClickHouse::new(&aggregator::sink::ClickHouseConfig {
        url: "http://127.0.0.1:1".into(),
        database: "allot".into(),
        user: None,
        password: None,
        timeout: Duration::from_secs(1),
    });
    let spool = |tls: Option<ClientTlsConfig>| {
        aggregator::source::spool::SpoolSource::new(
            std::slice::from_ref(&node.endpoint),
            "test",
            Duration::from_secs(10),
            None,
            tls.as_ref(),
            sink.clone(),
        )
        .unwrap()
    };

    // Trusting the CA but without a client certificate: refused.
    let no_cert = spool(Some(ca.dial(None)));
    let err = match no_cert.acquire(0).await {
        Ok(_) => panic!("a spool reader without a client certificate was served"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("unavailable"), "{err}");

    let source = spool(Some(ca.dial(Some(&reader))));
    let mut claim = source.acquire(0).await.unwrap().expect("the spool is free");
    let entries = claim.read(100).await.unwrap();
    assert!(
        entries.iter().any(|e| format!("{e:?}").contains("e-1")),
        "the recorded event is in the spool: {entries:?}"
    );
}

/// Runs `allot serve` with `args` (and a throwaway data directory); it must fail before
/// listening. Returns its stderr.
async fn serve_fails(dir: &Path, args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["serve", "--listen", "127.0.0.1:0", "--insecure-no-auth"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} started: {stderr}");
    assert!(!stdout.contains("listening on"), "{args:?}: {stdout}");
    stderr
}

#[tokio::test]
async fn bad_tls_files_stop_the_node_naming_the_option_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "ca");
    let (one, two) = (ca.node("one"), ca.node("two"));
    let garbage = d.join("garbage.pem");
    std::fs::write(&garbage, "this is not a certificate\n").unwrap();
    let broken = d.join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let missing = d.join("missing.pem");
    let (cert, key, wrong_key) = (path(&one.cert), path(&one.key), path(&two.key));

    let e = serve_fails(d, &["--tls-cert", path(&missing), "--tls-key", key]).await;
    assert!(
        e.contains(&format!("--tls-cert {}: cannot read", path(&missing))),
        "{e}"
    );

    let e = serve_fails(d, &["--tls-cert", path(&garbage), "--tls-key", key]).await;
    assert!(
        e.contains(&format!("--tls-cert {}: no certificate", path(&garbage))),
        "{e}"
    );

    let e = serve_fails(d, &["--tls-cert", cert, "--tls-key", path(&garbage)]).await;
    assert!(
        e.contains(&format!("--tls-key {}: no private key", path(&garbage))),
        "{e}"
    );

    let e = serve_fails(d, &["--tls-cert", cert, "--tls-key", wrong_key]).await;
    assert!(
        e.contains(&format!(
            "--tls-key {wrong_key}: this private key does not match the certificate in --tls-cert {cert}"
        )),
        "{e}"
    );

    let e = serve_fails(
        d,
        &[
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--tls-client-ca",
            path(&broken),
        ],
    )
    .await;
    assert!(
        e.contains(&format!("--tls-client-ca {}: malformed", path(&broken))),
        "{e}"
    );

    let e = serve_fails(d, &["--tls-client-ca", path(&ca.cert)]).await;
    assert!(
        e.contains("tls_client_ca: --tls-client-ca (mutual TLS) needs --tls-cert"),
        "{e}"
    );

    let e = serve_fails(d, &["--tls-cert", cert]).await;
    assert!(e.contains("--tls-cert needs --tls-key"), "{e}");

    // The same keys in a config file are checked the same way.
    let cfg = d.join("allot.toml");
    std::fs::write(
        &cfg,
        format!("tls_cert = {cert:?}\ntls_key = {wrong_key:?}\n"),
    )
    .unwrap();
    let e = serve_fails(d, &["--config", path(&cfg)]).await;
    assert!(e.contains("does not match the certificate"), "{e}");
}
