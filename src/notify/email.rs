//! Mail over SMTP (lettre's connection, one per delivery), or into `.eml` files when
//! no server is configured.
//!
//! Each step before the message body (connect, greeting, TLS, login, `MAIL`, `RCPT`,
//! `DATA`) is bounded by `MAIL_SMTP_TIMEOUT`; a failure there leaves nothing at the
//! server, so it is retried. Once the body has gone out, the server may have taken
//! the message: its final reply is awaited as long as RFC 5321 (4.5.3.2.6) allows,
//! [`FINAL_REPLY_WAIT`], or until shutdown, and a missing reply makes the delivery
//! [`SendError::Unknown`], never an automatic resend.

use super::templates::{one_line, Rendered};
use super::SendError;
use super::{MailSettings, SmtpTls};
use anyhow::Context;
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::{AsyncFileTransport, AsyncTransport, Message, Tokio1Executor};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long the final reply to the message body is awaited (RFC 5321 4.5.3.2.6:
/// "DATA Termination: 10 minutes").
pub const FINAL_REPLY_WAIT: Duration = Duration::from_secs(600);

/// An SMTP server and how to talk to it.
pub struct SmtpServer {
    host: String,
    port: u16,
    tls: SmtpTls,
    tls_parameters: Option<TlsParameters>,
    credentials: Option<Credentials>,
    hello: ClientId,
    /// Bound of each step before the body.
    timeout: Duration,
}

/// Where mail goes.
pub enum Mailer {
    /// An SMTP server.
    Smtp {
        /// The server.
        server: Box<SmtpServer>,
        /// `host:port (tls)`, for logs and messages.
        describe: String,
    },
    /// `.eml` files in a folder (development).
    Files {
        /// The folder, created on first use.
        dir: PathBuf,
    },
}

impl Mailer {
    /// The SMTP server the settings describe, or the file transport without
    /// `MAIL_SMTP_SERVER`.
    pub fn new(settings: &MailSettings) -> anyhow::Result<Self> {
        let Some(host) = &settings.smtp_server else {
            let dir = std::path::absolute(&settings.file_dir)
                .unwrap_or_else(|_| settings.file_dir.clone());
            return Ok(Self::Files { dir });
        };
        let tls_parameters = match settings.tls {
            SmtpTls::None => None,
            SmtpTls::Starttls | SmtpTls::Implicit => Some(
                TlsParameters::new(host.clone()).context("preparing TLS for MAIL_SMTP_SERVER")?,
            ),
        };
        let tls_name = match settings.tls {
            SmtpTls::Starttls => "STARTTLS",
            SmtpTls::Implicit => "implicit TLS",
            SmtpTls::None => "no TLS",
        };
        Ok(Self::Smtp {
            server: Box::new(SmtpServer {
                host: host.clone(),
                port: settings.smtp_port,
                tls: settings.tls,
                tls_parameters,
                credentials: settings.smtp_user.as_ref().map(|user| {
                    Credentials::new(user.clone(), settings.smtp_password.expose().to_owned())
                }),
                hello: ClientId::default(),
                timeout: settings.timeout,
            }),
            describe: format!("{host}:{} ({tls_name})", settings.smtp_port),
        })
    }

    /// Where mail goes, for the log.
    pub fn describe(&self) -> String {
        match self {
            Self::Smtp { describe, .. } => format!("SMTP server {describe}"),
            Self::Files { dir } => format!(".eml files in {}", dir.display()),
        }
    }

    /// Hands `message` to the server (or writes its file). `Ok` means accepted.
    /// `cancel` (shutdown) cuts the wait for the final reply short: `Unknown`.
    pub async fn send(
        &self,
        message: Message,
        cancel: &CancellationToken,
    ) -> Result<(), SendError> {
        match self {
            Self::Smtp { server, .. } => server.send(&message, cancel).await,
            Self::Files { dir } => {
                tokio::fs::create_dir_all(dir).await.map_err(|e| {
                    SendError::Transient(format!("creating {}: {e}", dir.display()))
                })?;
                AsyncFileTransport::<Tokio1Executor>::new(dir)
                    .send(message)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        SendError::Transient(format!("writing into {}: {e}", dir.display()))
                    })
            }
        }
    }
}

impl SmtpServer {
    async fn send(&self, message: &Message, cancel: &CancellationToken) -> Result<(), SendError> {
        let mut conn = self.step("connecting", self.connect()).await?;
        let result = self.transaction(&mut conn, message, cancel).await;
        match &result {
            Ok(()) => {
                let _ = tokio::time::timeout(self.timeout, conn.quit()).await;
            }
            Err(_) => {
                let _ = tokio::time::timeout(self.timeout, conn.abort()).await;
            }
        }
        result
    }

    /// Connects, greets, upgrades to TLS and logs in, as lettre's transport does.
    async fn connect(&self) -> Result<AsyncSmtpConnection, lettre::transport::smtp::Error> {
        let implicit = match self.tls {
            SmtpTls::Implicit => self.tls_parameters.clone(),
            _ => None,
        };
        let mut conn = AsyncSmtpConnection::connect_tokio1(
            (self.host.as_str(), self.port),
            Some(self.timeout),
            &self.hello,
            implicit,
            None,
        )
        .await?;
        if let (SmtpTls::Starttls, Some(parameters)) = (self.tls, &self.tls_parameters) {
            conn.starttls(parameters.clone(), &self.hello).await?;
        }
        if let Some(credentials) = &self.credentials {
            conn.auth(DEFAULT_MECHANISMS, credentials).await?;
        }
        Ok(conn)
    }

    async fn transaction(
        &self,
        conn: &mut AsyncSmtpConnection,
        message: &Message,
        cancel: &CancellationToken,
    ) -> Result<(), SendError> {
        let envelope = message.envelope();
        let body = message.formatted();
        let mut options = Vec::new();
        let non_ascii_address = envelope
            .to()
            .iter()
            .chain(envelope.from())
            .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
        if non_ascii_address {
            if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
                return Err(SendError::Permanent(
                    "an address is not ASCII and the server does not support SMTPUTF8".into(),
                ));
            }
            options.push(MailParameter::SmtpUtfEight);
        }
        if !body.is_ascii() {
            if !conn.server_info().supports_feature(Extension::EightBitMime) {
                return Err(SendError::Permanent(
                    "the message is not ASCII and the server does not support 8BITMIME".into(),
                ));
            }
            options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        self.step(
            "MAIL FROM",
            conn.command(Mail::new(envelope.from().cloned(), options)),
        )
        .await?;
        for to in envelope.to() {
            self.step("RCPT TO", conn.command(Rcpt::new(to.clone(), Vec::new())))
                .await?;
        }
        self.step("DATA", conn.command(Data)).await?;

        // The body: `transmitted` turns true once its last byte is written, just
        // before the end-of-data line.
        let transmitted = Arc::new(AtomicBool::new(false));
        let parts = Marked {
            parts: std::iter::once(body.as_slice()),
            done: transmitted.clone(),
        };
        let reply = conn.message_iter(parts);
        tokio::pin!(reply);
        let unknown = |why: &str| {
            SendError::Unknown(format!(
                "the message was transmitted but {why}: it may have been delivered; resend it by hand if it was not"
            ))
        };
        let answered = tokio::select! {
            answered = &mut reply => answered,
            _ = tokio::time::sleep(self.timeout) => {
                if !transmitted.load(Ordering::SeqCst) {
                    return Err(SendError::Transient(format!(
                        "the SMTP server did not take the message within {:?}",
                        self.timeout
                    )));
                }
                tokio::select! {
                    answered = &mut reply => answered,
                    _ = tokio::time::sleep(FINAL_REPLY_WAIT.saturating_sub(self.timeout)) => {
                        return Err(unknown(&format!("the server gave no final reply within {FINAL_REPLY_WAIT:?}")));
                    }
                    _ = cancel.cancelled() => {
                        return Err(unknown("the service stopped while waiting for the server's final reply"));
                    }
                }
            }
        };
        match answered {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(SendError::Permanent(smtp_error(&e))),
            Err(e) if e.is_transient() => Err(SendError::Transient(smtp_error(&e))),
            Err(e) if transmitted.load(Ordering::SeqCst) => Err(unknown(&format!(
                "no final reply came ({})",
                smtp_error(&e)
            ))),
            Err(e) => Err(SendError::Transient(smtp_error(&e))),
        }
    }

    /// One step before the body, bounded by `MAIL_SMTP_TIMEOUT`.
    async fn step<T>(
        &self,
        what: &str,
        step: impl Future<Output = Result<T, lettre::transport::smtp::Error>>,
    ) -> Result<T, SendError> {
        match tokio::time::timeout(self.timeout, step).await {
            Err(_) => Err(SendError::Transient(format!(
                "the SMTP server did not finish {what} within {:?}",
                self.timeout
            ))),
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if e.is_permanent() => Err(SendError::Permanent(smtp_error(&e))),
            Ok(Err(e)) => Err(SendError::Transient(smtp_error(&e))),
        }
    }
}

/// The parts of a message; sets `done` when asked for a part after the last one,
/// which lettre does once the last part is written.
struct Marked<I> {
    parts: I,
    done: Arc<AtomicBool>,
}

impl<I: Iterator> Iterator for Marked<I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        let next = self.parts.next();
        if next.is_none() {
            self.done.store(true, Ordering::SeqCst);
        }
        next
    }
}

/// lettre's error with its causes, on one line.
fn smtp_error(error: &lettre::transport::smtp::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    one_line(&text)
}

/// Who a notification goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipients {
    /// `To`.
    pub to: Vec<Mailbox>,
    /// `Cc`.
    pub cc: Vec<Mailbox>,
}

impl Recipients {
    /// The project's contacts in `To` and `CLOUD_GOVERNANCE_MAIL` in `Cc`; with
    /// `NOTIFICATION_TO_OVERWRITE`, that address alone. Contacts that no longer parse
    /// are left out (they were checked when set).
    pub fn new(settings: &MailSettings, contacts: &[String]) -> Self {
        if let Some(only) = &settings.to_overwrite {
            return Self {
                to: vec![only.clone()],
                cc: Vec::new(),
            };
        }
        Self {
            to: contacts.iter().filter_map(|c| c.parse().ok()).collect(),
            cc: settings.governance.clone(),
        }
    }

    /// Whether nobody would receive it.
    pub fn is_empty(&self) -> bool {
        self.to.is_empty() && self.cc.is_empty()
    }

    /// Every address, `To` first, for the record.
    pub fn addresses(&self) -> Vec<String> {
        self.to
            .iter()
            .chain(&self.cc)
            .map(|m| m.email.to_string())
            .collect()
    }
}

/// A notification mail: `From` the settings, the rendered subject and both parts.
/// `id` becomes a stable `Message-ID`, so a mail sent again is recognisable as the
/// same one.
pub fn compose(
    from: &Mailbox,
    recipients: &Recipients,
    rendered: &Rendered,
    id: &str,
) -> Result<Message, SendError> {
    let mut builder = Message::builder()
        .from(from.clone())
        .subject(one_line(&rendered.subject))
        .message_id(Some(format!("<{id}@{}>", from.email.domain())));
    for to in &recipients.to {
        builder = builder.to(to.clone());
    }
    for cc in &recipients.cc {
        builder = builder.cc(cc.clone());
    }
    builder
        .multipart(MultiPart::alternative_plain_html(
            rendered.text.clone(),
            rendered.html.clone(),
        ))
        .map_err(|e| SendError::Permanent(format!("the message cannot be built: {e}")))
}

/// `os-credits send-test-email --to ADDRESS`: one message through the configured
/// transport; failures say which setting to look at.
pub async fn send_test(settings: &MailSettings, to: &str) -> anyhow::Result<String> {
    let to: Mailbox = to
        .parse()
        .map_err(|e| anyhow::anyhow!("--to {to:?} is not an email address ({e})"))?;
    let mailer = Mailer::new(settings)?;
    let rendered = Rendered {
        subject: "os-credits test message".into(),
        text: format!(
            "This is a test message from os-credits.\n\nIt was sent through {}.\n",
            mailer.describe()
        ),
        html: format!(
            "<p>This is a test message from os-credits.</p><p>It was sent through {}.</p>",
            mailer.describe()
        ),
    };
    let recipients = Recipients {
        to: vec![to.clone()],
        cc: Vec::new(),
    };
    let id = format!("os-credits-test-{}", chrono::Utc::now().timestamp_micros());
    let message =
        compose(&settings.from, &recipients, &rendered, &id).map_err(|e| anyhow::anyhow!("{e}"))?;
    mailer
        .send(message, &CancellationToken::new())
        .await
        .map_err(|e| anyhow::anyhow!("{}", explain(settings, &e)))?;
    Ok(format!(
        "sent a test message to {to} through {}",
        mailer.describe()
    ))
}

/// A send failure with what to change.
pub fn explain(settings: &MailSettings, error: &SendError) -> String {
    let server = format!(
        "{}:{}",
        settings.smtp_server.as_deref().unwrap_or("(none)"),
        settings.smtp_port
    );
    let text = error.to_string();
    let lower = text.to_ascii_lowercase();
    let hint = if settings.smtp_server.is_none() {
        "check that MAIL_FILE_DIR is a writable folder"
    } else if lower.contains("connection refused") {
        "nothing accepts connections there: check MAIL_SMTP_SERVER and MAIL_SMTP_PORT"
    } else if lower.contains("failed to lookup")
        || lower.contains("name or service not known")
        || lower.contains("dns")
    {
        "the host name does not resolve: check MAIL_SMTP_SERVER"
    } else if lower.contains("starttls") {
        "the server does not offer STARTTLS: use MAIL_SMTP_TLS=implicit (usually with MAIL_SMTP_PORT=465) if it speaks TLS from the start, or MAIL_NOT_STARTTLS only for a trusted local relay"
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake")
    {
        "the TLS handshake failed: check that MAIL_SMTP_SERVER is the name in the server's certificate, and MAIL_SMTP_TLS (starttls on 25/587, implicit on 465)"
    } else if lower.contains("did not finish") || lower.contains("timed out") {
        "the server is too slow or a firewall drops the connection: check MAIL_SMTP_SERVER, MAIL_SMTP_PORT and MAIL_SMTP_TLS (implicit TLS against a STARTTLS port waits forever), or raise MAIL_SMTP_TIMEOUT"
    } else if lower.contains("(535)") || lower.contains("(534)") || lower.contains("credentials") {
        "the login was refused: check MAIL_SMTP_USER and MAIL_SMTP_PASSWORD"
    } else if lower.contains("(530)") || lower.contains("authentication required") {
        "the server wants a login: set MAIL_SMTP_USER and MAIL_SMTP_PASSWORD"
    } else if lower.contains("(550)") || lower.contains("(553)") || lower.contains("(554)") {
        "the server refused the sender or the recipient: check MAIL_FROM (may this account send as it?) and the address"
    } else {
        "check the MAIL_SMTP_* settings"
    };
    format!("sending through {server} failed: {text}\n  fix: {hint}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn mail(vars: &[(&str, &str)]) -> MailSettings {
        Settings::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .unwrap_or_else(|e| panic!("{e}"))
            .mail
    }

    fn rendered(subject: &str) -> Rendered {
        Rendered {
            subject: subject.into(),
            text: "text".into(),
            html: "<p>html</p>".into(),
        }
    }

    #[test]
    fn recipients_are_contacts_and_governance_unless_overwritten() {
        let contacts = [
            "owner@example.org".to_owned(),
            "second@example.org".to_owned(),
        ];
        let normal = Recipients::new(
            &mail(&[("CLOUD_GOVERNANCE_MAIL", "gov@example.org")]),
            &contacts,
        );
        assert_eq!(
            normal.addresses(),
            ["owner@example.org", "second@example.org", "gov@example.org"]
        );
        assert_eq!(normal.cc.len(), 1);
        let overwritten = Recipients::new(
            &mail(&[
                ("CLOUD_GOVERNANCE_MAIL", "gov@example.org"),
                ("NOTIFICATION_TO_OVERWRITE", "test@example.org"),
            ]),
            &contacts,
        );
        assert_eq!(overwritten.addresses(), ["test@example.org"]);
        assert!(Recipients::new(&mail(&[]), &[]).is_empty());
    }

    #[test]
    fn composed_headers_cannot_be_injected() {
        let recipients = Recipients::new(&mail(&[]), &["owner@example.org".to_owned()]);
        let message = compose(
            &mail(&[]).from,
            &recipients,
            &rendered("Alpha\r\nBcc: evil@example.org\r\n\r\nbody"),
            "os-credits-notification-1",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let text = String::from_utf8_lossy(&message.formatted()).into_owned();
        let head = text.split("\r\n\r\n").next().unwrap_or_default();
        assert!(!head.contains("\r\nBcc:"), "{head}");
        assert!(
            head.contains("Subject: Alpha Bcc: evil@example.org body"),
            "{head}"
        );
        assert!(
            head.contains("Message-ID: <os-credits-notification-1@denbi.de>"),
            "{head}"
        );
        assert_eq!(message.envelope().to().len(), 1);
    }

    #[test]
    fn failures_say_what_to_fix() {
        let smtp = mail(&[("MAIL_SMTP_SERVER", "mail.example.org")]);
        let cases = [
            ("Connection refused (os error 111)", "MAIL_SMTP_PORT"),
            (
                "permanent error (535): Invalid credentials",
                "MAIL_SMTP_PASSWORD",
            ),
            (
                "permanent error (530): Authentication required",
                "MAIL_SMTP_USER",
            ),
            (
                "the SMTP server did not finish within 30s",
                "MAIL_SMTP_TIMEOUT",
            ),
            (
                "client error: STARTTLS is not supported by this server",
                "MAIL_SMTP_TLS=implicit",
            ),
            (
                "tls error: invalid peer certificate: UnknownIssuer",
                "certificate",
            ),
            ("permanent error (550): Mailbox unavailable", "MAIL_FROM"),
        ];
        for (error, hint) in cases {
            let message = explain(&smtp, &SendError::Transient(error.into()));
            assert!(message.contains(hint), "{error}: {message}");
            assert!(message.contains("mail.example.org:25"), "{message}");
        }
    }
}
