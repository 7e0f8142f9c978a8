//! Credential file shapes: parsing a JSON document into a [`CredentialFile`] and applying a
//! refreshed token back onto the same document in the file's own conventions.
//!
//! Pure functions over `serde_json` values: no I/O (that is `store`), no network. A
//! document is edited in place so every field tokenrelay does not know survives a
//! write-back, and the expiry field keeps its unit (`expiry_date` milliseconds,
//! `expires_at` seconds, `expires_in` relative to the write).

use secrecy::SecretString;
use serde_json::{Map, Value};

/// The shapes in DESIGN.md's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// gcloud ADC, `"type": "authorized_user"`.
    AuthorizedUser,
    /// Google service-account key, `"type": "service_account"`.
    ServiceAccount,
    /// Gemini CLI / Qwen Code: `expiry_date` in milliseconds.
    Cli,
    /// The seed's generic shape: `expires_at` (seconds) and/or `expires_in`.
    Generic,
}

impl Shape {
    pub fn as_str(self) -> &'static str {
        match self {
            Shape::AuthorizedUser => "authorized_user",
            Shape::ServiceAccount => "service_account",
            Shape::Cli => "cli",
            Shape::Generic => "generic",
        }
    }
}

/// How a file states when its access token expires; kept on write-back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryField {
    /// `expiry_date`, Unix milliseconds.
    Millis,
    /// `expires_at`, Unix seconds (a float when the file used one).
    Seconds { float: bool },
    /// Only `expires_in`: seconds counted from the file's modification time.
    RelativeToMtime,
    /// No expiry field.
    None,
}

/// What tokenrelay needs from a credential file. Secrets stay in `SecretString`.
#[derive(Debug, Clone)]
pub struct CredentialFile {
    pub shape: Shape,
    pub expiry_field: ExpiryField,
    pub access_token: Option<SecretString>,
    /// Unix milliseconds.
    pub expires_at_ms: Option<i64>,
    pub refresh_token: Option<SecretString>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
    pub resource_url: Option<String>,
    pub quota_project_id: Option<String>,
    /// A service account's `project_id`.
    pub project_id: Option<String>,
    /// Service accounts: the signing key and identity.
    pub service_account: Option<ServiceAccountKey>,
    /// Who this credential signs in as (`account` of a login's file, a service account's
    /// `client_email`), for operators; never used to decide anything.
    pub account: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ServiceAccountKey {
    pub client_email: String,
    pub private_key: SecretString,
    pub private_key_id: Option<String>,
    pub token_uri: Option<String>,
}

/// A field that is missing or of the wrong type; never carries a field's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not valid JSON (line {line}, column {column}): {problem}")]
    Json {
        line: usize,
        column: usize,
        problem: String,
    },
    #[error("the top level must be a JSON object")]
    NotAnObject,
    #[error("field `{field}` must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("unsupported credential type {0:?}: tokenrelay reads authorized_user and service_account files, or files with access/refresh tokens")]
    UnsupportedType(String),
    #[error("no `refresh_token` and no `access_token`: nothing to authenticate with")]
    NoToken,
    #[error("field `{0}` is required for this shape")]
    Missing(&'static str),
}

/// The outcome of a refresh, to be stored in memory and written back.
#[derive(Debug, Clone)]
pub struct TokenUpdate {
    pub access_token: SecretString,
    pub expires_in_secs: u64,
    /// Set when the token endpoint rotated the refresh token.
    pub refresh_token: Option<SecretString>,
    pub resource_url: Option<String>,
}

/// Parses a credential document. `mtime_ms` anchors a bare `expires_in`.
pub fn parse(
    bytes: &[u8],
    mtime_ms: i64,
) -> Result<(CredentialFile, Map<String, Value>), ParseError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| ParseError::Json {
        line: e.line(),
        column: e.column(),
        problem: json_problem(&e),
    })?;
    let Value::Object(doc) = value else {
        return Err(ParseError::NotAnObject);
    };
    let file = interpret(&doc, mtime_ms)?;
    Ok((file, doc))
}

/// serde_json's message minus any echo of the input (it never echoes values, but keep
/// only the category to be sure nothing secret leaks through an error).
fn json_problem(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Eof => "unexpected end of file (truncated?)".into(),
        Category::Syntax => "syntax error".into(),
        Category::Data => "unexpected data".into(),
        Category::Io => "read error".into(),
    }
}

fn interpret(doc: &Map<String, Value>, mtime_ms: i64) -> Result<CredentialFile, ParseError> {
    let kind = opt_str(doc, "type")?;
    let shape = match kind.as_deref() {
        Some("authorized_user") => Shape::AuthorizedUser,
        Some("service_account") => Shape::ServiceAccount,
        Some(other) => return Err(ParseError::UnsupportedType(other.to_string())),
        None if doc.contains_key("expiry_date") => Shape::Cli,
        None => Shape::Generic,
    };
    let service_account = if shape == Shape::ServiceAccount {
        Some(ServiceAccountKey {
            client_email: opt_str(doc, "client_email")?
                .ok_or(ParseError::Missing("client_email"))?,
            private_key: opt_secret(doc, "private_key")?
                .ok_or(ParseError::Missing("private_key"))?,
            private_key_id: opt_str(doc, "private_key_id")?,
            token_uri: opt_str(doc, "token_uri")?,
        })
    } else {
        None
    };

    let (expiry_field, expires_at_ms) = if let Some(v) = doc.get("expiry_date") {
        let ms = v.as_f64().ok_or(ParseError::WrongType {
            field: "expiry_date",
            expected: "a number (Unix milliseconds)",
        })?;
        (ExpiryField::Millis, Some(ms as i64))
    } else if let Some(v) = doc.get("expires_at") {
        let float = v.is_f64();
        let s = v.as_f64().ok_or(ParseError::WrongType {
            field: "expires_at",
            expected: "a number (Unix seconds)",
        })?;
        (ExpiryField::Seconds { float }, Some((s * 1000.0) as i64))
    } else if let Some(v) = doc.get("expires_in") {
        let s = v.as_f64().ok_or(ParseError::WrongType {
            field: "expires_in",
            expected: "a number of seconds",
        })?;
        (
            ExpiryField::RelativeToMtime,
            Some(mtime_ms + (s * 1000.0) as i64),
        )
    } else {
        (ExpiryField::None, None)
    };

    let access_token = opt_secret(doc, "access_token")?;
    let refresh_token = opt_secret(doc, "refresh_token")?;
    if shape != Shape::ServiceAccount && access_token.is_none() && refresh_token.is_none() {
        return Err(ParseError::NoToken);
    }
    Ok(CredentialFile {
        shape,
        expiry_field,
        // A token without a known expiry is treated as expired: refresh before use.
        expires_at_ms: expires_at_ms.filter(|_| access_token.is_some()),
        access_token,
        refresh_token,
        client_id: opt_str(doc, "client_id")?.filter(|c| !c.is_empty()),
        client_secret: opt_secret(doc, "client_secret")?,
        resource_url: opt_str(doc, "resource_url")?.filter(|c| !c.is_empty()),
        quota_project_id: opt_str(doc, "quota_project_id")?.filter(|c| !c.is_empty()),
        project_id: opt_str(doc, "project_id")?.filter(|c| !c.is_empty()),
        account: opt_str(doc, "account")
            .ok()
            .flatten()
            .or_else(|| service_account.as_ref().map(|sa| sa.client_email.clone())),
        service_account,
    })
}

fn opt_str(doc: &Map<String, Value>, field: &'static str) -> Result<Option<String>, ParseError> {
    match doc.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ParseError::WrongType {
            field,
            expected: "a string",
        }),
    }
}

fn opt_secret(
    doc: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<SecretString>, ParseError> {
    Ok(opt_str(doc, field)?
        .filter(|s| !s.is_empty())
        .map(SecretString::from))
}

/// Writes `update` onto `doc` in the document's own conventions. Only fields the file
/// already stores are changed, plus `refresh_token` when it rotated: an ADC file that held
/// no access token does not grow one. Returns whether anything changed.
pub fn apply_update(doc: &mut Map<String, Value>, update: &TokenUpdate, now_ms: i64) -> bool {
    use secrecy::ExposeSecret;
    let before = doc.clone();
    let expires_at_ms = now_ms + (update.expires_in_secs as i64) * 1000;
    if doc.contains_key("access_token") {
        doc.insert(
            "access_token".into(),
            Value::String(update.access_token.expose_secret().to_string()),
        );
        if doc.contains_key("expiry_date") {
            doc.insert("expiry_date".into(), Value::from(expires_at_ms));
        }
        if let Some(old) = doc.get("expires_at") {
            let v = if old.is_f64() {
                Value::from(expires_at_ms as f64 / 1000.0)
            } else {
                Value::from(expires_at_ms / 1000)
            };
            doc.insert("expires_at".into(), v);
        }
        if doc.contains_key("expires_in") {
            doc.insert("expires_in".into(), Value::from(update.expires_in_secs));
        }
    }
    if let Some(rt) = &update.refresh_token {
        doc.insert(
            "refresh_token".into(),
            Value::String(rt.expose_secret().to_string()),
        );
    }
    if let (Some(url), true) = (&update.resource_url, doc.contains_key("resource_url")) {
        doc.insert("resource_url".into(), Value::String(url.clone()));
    }
    *doc != before
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const QWEN: &str = include_str!("../../tests/fixtures/credentials/qwen_oauth_creds.json");
    const SEED: &str =
        include_str!("../../tests/fixtures/credentials/seed_authorized_user_with_token.json");
    const ADC: &str = include_str!("../../tests/fixtures/credentials/adc_authorized_user.json");
    const GENERIC: &str = include_str!("../../tests/fixtures/credentials/seed_generic.json");

    #[test]
    fn cli_shape_reads_milliseconds_and_resource_url() {
        let (f, _) = parse(QWEN.as_bytes(), 0).unwrap();
        assert_eq!(f.shape, Shape::Cli);
        assert_eq!(f.expiry_field, ExpiryField::Millis);
        assert_eq!(f.expires_at_ms, Some(1_764_300_000_000));
        assert_eq!(f.resource_url.as_deref(), Some("portal.qwen.ai"));
        assert!(f.client_id.is_none());
    }

    #[test]
    fn adc_has_client_and_quota_project_but_no_token() {
        let (f, _) = parse(ADC.as_bytes(), 0).unwrap();
        assert_eq!(f.shape, Shape::AuthorizedUser);
        assert!(f.access_token.is_none() && f.expires_at_ms.is_none());
        assert_eq!(f.quota_project_id.as_deref(), Some("my-gcp-project"));
        assert!(f.client_secret.is_some());
    }

    #[test]
    fn float_expires_at_is_seconds() {
        let (f, _) = parse(SEED.as_bytes(), 0).unwrap();
        assert_eq!(f.expiry_field, ExpiryField::Seconds { float: true });
        assert_eq!(f.expires_at_ms, Some(1_645_123_456_123));
        let (g, _) = parse(GENERIC.as_bytes(), 0).unwrap();
        assert_eq!(g.shape, Shape::Generic);
    }

    #[test]
    fn bare_expires_in_counts_from_mtime() {
        let (f, _) = parse(br#"{"access_token":"a","expires_in":60}"#, 1_000).unwrap();
        assert_eq!(f.expiry_field, ExpiryField::RelativeToMtime);
        assert_eq!(f.expires_at_ms, Some(61_000));
    }

    #[test]
    fn update_keeps_units_and_unknown_fields() {
        let (_, mut doc) = parse(SEED.as_bytes(), 0).unwrap();
        doc.insert("custom".into(), Value::from("kept"));
        let up = TokenUpdate {
            access_token: "new".into(),
            expires_in_secs: 3599,
            refresh_token: None,
            resource_url: None,
        };
        assert!(apply_update(&mut doc, &up, 1_000_000_000_000));
        assert_eq!(doc["expires_at"].as_f64(), Some(1_000_003_599.0));
        assert_eq!(doc["expires_in"], 3599);
        assert_eq!(doc["custom"], "kept");
        let (f, _) = parse(&serde_json::to_vec(&doc).unwrap(), 0).unwrap();
        assert_eq!(f.access_token.unwrap().expose_secret(), "new");
    }

    #[test]
    fn adc_without_token_does_not_grow_one() {
        let (_, mut doc) = parse(ADC.as_bytes(), 0).unwrap();
        let up = TokenUpdate {
            access_token: "new".into(),
            expires_in_secs: 3599,
            refresh_token: None,
            resource_url: None,
        };
        assert!(!apply_update(&mut doc, &up, 0));
        assert!(!doc.contains_key("access_token"));
    }

    #[test]
    fn errors_name_the_field_not_the_value() {
        let e = parse(br#"{"access_token":"sekrit","expiry_date":"soon"}"#, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "field `expiry_date` must be a number (Unix milliseconds)"
        );
        let e = parse(br#"{"access_token":"sekr"#, 0).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        assert!(!e.to_string().contains("sekr"));
        assert_eq!(parse(b"[]", 0).unwrap_err(), ParseError::NotAnObject);
        assert_eq!(parse(b"{}", 0).unwrap_err(), ParseError::NoToken);
    }
}
