//! SMTP as production uses it, against a real server on loopback (aiosmtpd from
//! PyPI, in the venv `scripts/ensure-aiosmtpd.sh` makes; `make test` runs it) with a
//! throwaway CA: STARTTLS (the default), implicit TLS, login, a certificate the
//! service must not trust, and the bound on each step of a send to a server that stops
//! answering before it has the message.
//! The real binary sends (`os-credits send-test-email`), trusting the throwaway CA
//! through `SSL_CERT_FILE` set for it alone.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The aiosmtpd server of one test, stopped when dropped.
struct SmtpServer {
    child: Child,
    port: u16,
    ca: String,
    messages: mpsc::Receiver<Value>,
    dir: PathBuf,
}

fn python() -> PathBuf {
    let venv = std::env::var_os("OSC_SMTP_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".dev/venv-smtp"));
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "no aiosmtpd venv at {}: run scripts/ensure-aiosmtpd.sh (make test does)",
        venv.display()
    );
    python
}

impl SmtpServer {
    fn start(mode: &str, extra: &[&str]) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "osc-smtp-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut child = Command::new(python())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smtp/server.py"))
            .arg(&dir)
            .arg(mode)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start aiosmtpd");
        let (lines, messages) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    let _ = lines.send(value);
                }
            }
        });
        let ready = messages
            .recv_timeout(Duration::from_secs(60))
            .expect("aiosmtpd says where it listens");
        Self {
            child,
            port: ready["port"].as_u64().expect("port") as u16,
            ca: ready["ca"].as_str().expect("ca").to_owned(),
            messages,
            dir,
        }
    }

    /// The next message the server accepted, if one comes within a minute.
    fn next_message(&self) -> Value {
        self.messages
            .recv_timeout(Duration::from_secs(60))
            .expect("a message reached the server")
    }

    fn no_message(&self) -> bool {
        self.messages.try_recv().is_err()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `os-credits send-test-email` with `vars`; (succeeded, stdout + stderr). Bounded:
/// a send that never ends fails the test.
fn send_test_email(vars: &[(&str, &str)]) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_os-credits"))
        .args(["send-test-email", "--to", "admin@example.org"])
        .env_remove("MAIL_NOT_STARTTLS")
        .env_remove("SSL_CERT_FILE")
        .env("MAIL_FROM", "Cloud Credits <credits@example.org>")
        .env("RUST_LOG", "warn")
        .envs(vars.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start os-credits");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("send-test-email did not end within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (status.success(), text)
}

#[test]
fn starttls_is_the_default_and_the_mail_arrives_encrypted() {
    let server = SmtpServer::start("starttls", &[]);
    let port = server.port.to_string();

    let (ok, output) = send_test_email(&[
        ("MAIL_SMTP_SERVER", "127.0.0.1"),
        ("MAIL_SMTP_PORT", &port),
        ("SSL_CERT_FILE", &server.ca),
    ]);

    assert!(ok, "{output}");
    let message = server.next_message();
    assert_eq!(message["tls"], true, "sent after STARTTLS: {message}");
    assert_eq!(
        message["rcpt_tos"],
        serde_json::json!(["admin@example.org"])
    );
    assert_eq!(message["mail_from"], "credits@example.org");
    let data = message["data"].as_str().unwrap_or_default();
    assert!(data.contains("Subject: os-credits test message"), "{data}");
    assert!(
        data.lines().any(|l| l.starts_with("Message-ID: <os-credits-test-")
            && l.ends_with("@example.org>")),
        "a Message-ID in the sender's domain: {data}"
    );
}

#[test]
fn implicit_tls_speaks_tls_from_the_first_byte() {
    let server = SmtpServer::start("implicit", &[]);
    let port = server.port.to_string();

    let (ok, output) = send_test_email(&[
        ("MAIL_SMTP_SERVER", "127.0.0.1"),
        ("MAIL_SMTP_PORT", &port),
        ("MAIL_SMTP_TLS", "implicit"),
        ("SSL_CERT_FILE", &server.ca),
    ]);

    assert!(ok, "{output}");
    assert_eq!(server.next_message()["tls"], true);
}

#[test]
fn login_over_starttls_is_sent_and_a_wrong_password_says_what_to_fix() {
    let server = SmtpServer::start("starttls", &["--login", "credits:s3cret pass"]);
    let port = server.port.to_string();
    let base = [
        ("MAIL_SMTP_SERVER", "127.0.0.1"),
        ("MAIL_SMTP_PORT", port.as_str()),
        ("SSL_CERT_FILE", server.ca.as_str()),
        ("MAIL_SMTP_USER", "credits"),
    ];

    let (ok, output) =
        send_test_email(&[&base[..], &[("MAIL_SMTP_PASSWORD", "s3cret pass")]].concat());
    let (wrong, refused) =
        send_test_email(&[&base[..], &[("MAIL_SMTP_PASSWORD", "guess")]].concat());
    let (anonymous, wants_login) = send_test_email(&base[..3]);

    assert!(ok, "{output}");
    let message = server.next_message();
    assert_eq!(message["login"], "credits", "{message}");
    assert_eq!(message["tls"], true);
    assert!(!wrong, "{refused}");
    assert!(
        refused.contains("MAIL_SMTP_USER and MAIL_SMTP_PASSWORD"),
        "{refused}"
    );
    assert!(
        !refused.contains("guess"),
        "the password is not shown: {refused}"
    );
    assert!(!anonymous, "{wants_login}");
    assert!(server.no_message(), "nothing else was accepted");
}

#[test]
fn a_certificate_the_system_does_not_trust_stops_the_send() {
    let server = SmtpServer::start("starttls", &[]);
    let port = server.port.to_string();

    let (ok, output) =
        send_test_email(&[("MAIL_SMTP_SERVER", "127.0.0.1"), ("MAIL_SMTP_PORT", &port)]);

    assert!(!ok, "sent despite an untrusted certificate: {output}");
    assert!(output.contains("TLS handshake failed"), "{output}");
    assert!(server.no_message());
}

#[test]
fn a_server_that_stops_answering_before_the_message_fails_the_send_within_its_bound() {
    let server = SmtpServer::start("starttls", &["--stall"]);
    let port = server.port.to_string();

    let (ok, output) = send_test_email(&[
        ("MAIL_SMTP_SERVER", "127.0.0.1"),
        ("MAIL_SMTP_PORT", &port),
        ("SSL_CERT_FILE", &server.ca),
        ("MAIL_SMTP_TIMEOUT", "1"),
    ]);

    assert!(!ok, "{output}");
    assert!(
        output.contains("did not finish RCPT TO within 1s"),
        "MAIL_SMTP_TIMEOUT ends the step: {output}"
    );
    assert!(output.contains("MAIL_SMTP_TIMEOUT"), "{output}");
}
