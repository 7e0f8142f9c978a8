//! Configuration errors name the file, the key and the problem.

use tokenrelay::Config;

fn load(toml: &str) -> Result<Config, String> {
    let env = |k: &str| match k {
        "HOME" => Some("/nonexistent-home".to_string()),
        "TEAM_KEY" => Some("from-env".to_string()),
        _ => None,
    };
    Config::from_toml(toml, "my.toml", &env).map_err(|e| e.to_string())
}

fn assert_err(toml: &str, wants: &[&str]) {
    let e = load(toml).expect_err("config should be refused");
    assert!(e.starts_with("my.toml"), "{e}");
    for w in wants {
        assert!(e.contains(w), "{e:?} lacks {w:?}");
    }
}

#[test]
fn unknown_keys_are_refused() {
    assert_err("[server]\nlisen = \"127.0.0.1:1\"", &["lisen", "listen"]);
    assert_err("[refresh]\nlead = \"5m\"", &["lead"]);
    assert_err(
        "[providers.qwen]\nupstreams = \"https://x\"",
        &["upstreams"],
    );
}

#[test]
fn bad_urls_durations_and_sizes_are_refused() {
    assert_err(
        "[providers.qwen]\nupstream = \"not a url\"",
        &["providers.qwen.upstream", "not a URL"],
    );
    assert_err(
        "[providers.qwen]\ntoken_url = \"ftp://x/token\"",
        &["providers.qwen.token_url", "http"],
    );
    assert_err(
        "[refresh]\nlead_time = \"5 fortnights\"",
        &["refresh.lead_time", "duration"],
    );
    assert_err(
        "[server]\nmax_request_body = \"lots\"",
        &["server.max_request_body", "size"],
    );
    assert_err(
        "[server]\nlisten = \"localhost\"",
        &["server.listen", "address"],
    );
    assert_err(
        "[pool]\nstrategy = \"random\"",
        &["pool.strategy", "round_robin"],
    );
}

#[test]
fn a_missing_credential_file_is_refused() {
    assert_err(
        "[providers.qwen]\ncredentials = [\"/nonexistent/creds.json\"]",
        &[
            "providers.qwen.credentials[0]",
            "/nonexistent/creds.json",
            "does not exist",
        ],
    );
    // ...unless it is marked optional, or it is a glob or directory that matches nothing.
    let dir = tempfile::tempdir().unwrap();
    let ok = format!(
        "[providers.qwen]\ncredentials = [{{ path = \"/nonexistent/c.json\", optional = true }}, \"{0}/*.json\", \"{0}\"]",
        dir.path().display()
    );
    load(&ok).unwrap();
}

#[test]
fn custom_providers_need_upstream_and_token_url() {
    assert_err(
        "[providers.acme]\nupstream = \"https://api.acme.test\"",
        &["providers.acme.token_url", "required"],
    );
    let c = load("[providers.acme]\nupstream = \"https://api.acme.test\"\ntoken_url = \"https://auth.acme.test/token\"\nclient_id = \"x\"").unwrap();
    assert_eq!(c.providers.len(), 1);
    assert_eq!(c.providers[0].name, "acme");
}

#[test]
fn secrets_come_from_env_and_files() {
    let c = load("[server]\nclient_keys = [\"env:TEAM_KEY\"]").unwrap();
    assert_eq!(c.server.client_keys.len(), 1);
    assert_err(
        "[server]\nclient_keys = [\"env:NOPE\"]",
        &["server.client_keys[0]", "NOPE"],
    );
    assert_err(
        "[providers.qwen]\napi_keys = [\"file:/nonexistent/key\"]",
        &["providers.qwen.api_keys[0]", "/nonexistent/key"],
    );
}

#[test]
fn exposed_listeners_need_keys() {
    assert_err(
        "[server]\nlisten = \"0.0.0.0:8080\"",
        &["server.listen", "client_keys"],
    );
    load("[server]\nlisten = \"0.0.0.0:8080\"\nclient_keys = [\"k\"]").unwrap();
    load("[server]\nlisten = \"0.0.0.0:8080\"\nallow_unauthenticated = true").unwrap();
}

#[test]
fn environment_variables_add_credentials_and_override_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("oauth_creds.json");
    std::fs::write(
        &f,
        include_str!("fixtures/credentials/qwen_oauth_creds.json"),
    )
    .unwrap();
    let path = f.display().to_string();
    let env = move |k: &str| match k {
        "QWEN_CODE_OAUTH_CREDENTIALS" => Some(path.clone()),
        "TOKENRELAY_LISTEN" => Some("127.0.0.1:18080".to_string()),
        "HOME" => Some("/nonexistent-home".into()),
        _ => None,
    };
    let c = Config::from_toml("[providers.gemini]", "my.toml", &env).unwrap();
    let names: Vec<_> = c.providers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["gemini", "qwen"]);
    assert_eq!(c.server.listen.port(), 18080);
    let qwen = &c.providers[1];
    let from_env = qwen
        .credentials
        .iter()
        .find(|e| e.origin == "QWEN_CODE_OAUTH_CREDENTIALS")
        .unwrap();
    assert_eq!(from_env.resolve().unwrap()[0].path, f);
    // A missing file named by the variable is an error naming the variable.
    let env =
        |k: &str| (k == "QWEN_CODE_OAUTH_CREDENTIALS").then(|| "/nonexistent/x.json".to_string());
    let e = Config::from_toml("", "my.toml", &env)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("QWEN_CODE_OAUTH_CREDENTIALS") && e.contains("/nonexistent/x.json"),
        "{e}"
    );
}

#[test]
fn clients_are_checked_and_name_what_is_wrong() {
    let c = load("[[clients]]\nname = \"bot\"\nkey = \"env:TEAM_KEY\"\nproviders = [\"gemini\"]\nmodels = [\"gemini-2.5-*\"]\nrpm = 5").unwrap();
    assert_eq!(c.clients.len(), 1);
    assert_eq!(c.clients[0].name, "bot");
    assert_err(
        "[[clients]]\nname = \"bot\"\nkey = \"k\"\nproviders = [\"nope\"]",
        &["clients[0].providers", "nope", "configured"],
    );
    assert_err(
        "[[clients]]\nname = \"bot\"\nkey = \"k1\"\n[[clients]]\nname = \"bot\"\nkey = \"k2\"",
        &["clients[1].name", "taken"],
    );
    assert_err(
        "[server]\nclient_keys = [\"k\"]\n[[clients]]\nname = \"bot\"\nkey = \"k\"",
        &["clients[0].key", "own key"],
    );
    assert_err(
        "[[clients]]\nname = \"bot\"\nkey = \"k\"\ntokens_per_day = 0",
        &["clients[0].tokens_per_day", "above 0"],
    );
    assert_err(
        "[[clients]]\nname = \"bot\"\nkey = \"env:NOPE\"",
        &["clients[0].key", "NOPE"],
    );
    assert_err(
        "[providers.gemini.limits]\n\"gemini-2.5-pro\" = { rpm = 0 }",
        &["providers.gemini.limits", "above 0"],
    );
}

#[test]
fn a_syntax_error_names_its_line_but_never_quotes_it() {
    // The broken line holds a literal key: the error (logged, and answered by
    // POST /admin/reload) says where, not what.
    let env = |_: &str| None;
    let e = tokenrelay::Config::from_toml(
        "[server]\nlisten = \"127.0.0.1:0\"\n[[clients]]\nname = \"bot\"\nkey = \"sk-live-secret-123\" oops\n",
        "c.toml",
        &env,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("c.toml") && e.contains("line 5"), "{e}");
    assert!(!e.contains("sk-live-secret-123"), "{e}");
    // A value of the wrong type is named by its type, never quoted.
    let e = tokenrelay::Config::from_toml(
        "[server]\nclient_keys = \"sk-live-secret-456\"\n",
        "c.toml",
        &env,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("line 2") && e.contains("invalid type"), "{e}");
    assert!(!e.contains("sk-live-secret-456"), "{e}");
}
