//! Property tests: credential files and configurations that are random, truncated or of
//! the wrong types never panic and always get an error that names the problem (and
//! never echoes a value). `fuzz/` runs the same parsers under libFuzzer.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const FIXTURES: [&str; 6] = [
    include_str!("fixtures/credentials/adc_authorized_user.json"),
    include_str!("fixtures/credentials/gemini_cli_oauth_creds.json"),
    include_str!("fixtures/credentials/qwen_oauth_creds.json"),
    include_str!("fixtures/credentials/seed_authorized_user_with_token.json"),
    include_str!("fixtures/credentials/seed_generic.json"),
    include_str!("fixtures/credentials/service_account_test_key.json"),
];

/// The secret values of a fixture: an error must not contain them.
fn values(text: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(text).unwrap();
    [
        "access_token",
        "refresh_token",
        "client_secret",
        "private_key",
        "id_token",
    ]
    .iter()
    .filter_map(|k| v[k].as_str())
    .map(String::from)
    .collect()
}

fn check(bytes: &[u8], secrets: &[String]) {
    if let Err(e) = tokenrelay::store::shape::parse(bytes, 0) {
        let msg = e.to_string();
        assert!(!msg.is_empty());
        for s in secrets {
            assert!(!msg.contains(s.as_str()), "error echoes a value: {msg}");
        }
    }
}

#[test]
fn every_truncation_of_every_fixture_is_a_clear_error_or_a_credential() {
    for f in FIXTURES {
        let secrets = values(f);
        for cut in 0..f.len() {
            if f.is_char_boundary(cut) {
                check(&f.as_bytes()[..cut], &secrets);
            }
        }
        assert!(tokenrelay::store::shape::parse(f.as_bytes(), 0).is_ok());
    }
}

#[test]
fn random_bytes_and_mutations_never_panic() {
    let mut rng = StdRng::seed_from_u64(0x70c3_2e1a);
    for _ in 0..2000 {
        let len = rng.random_range(0..256);
        let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        check(&bytes, &[]);
    }
    for f in FIXTURES {
        let secrets = values(f);
        for _ in 0..500 {
            let mut bytes = f.as_bytes().to_vec();
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..bytes.len());
                bytes[i] = rng.random();
            }
            check(&bytes, &secrets);
        }
    }
}

/// Known fields with every JSON type: wrong ones name the field.
#[test]
fn wrong_types_name_the_field() {
    let wrongs = [
        json!(null),
        json!(true),
        json!(12),
        json!(-1.5),
        json!("text"),
        json!([1, "a"]),
        json!({"a": 1}),
    ];
    let fields = [
        "access_token",
        "refresh_token",
        "expiry_date",
        "expires_at",
        "expires_in",
        "client_id",
        "client_secret",
        "type",
        "resource_url",
    ];
    for field in fields {
        for w in &wrongs {
            let mut doc = json!({"access_token": "tok-SECRET-VALUE", "refresh_token": "rt-SECRET-VALUE", "expiry_date": 1});
            doc[field] = w.clone();
            let bytes = serde_json::to_vec(&doc).unwrap();
            match tokenrelay::store::shape::parse(&bytes, 0) {
                Ok(_) => {}
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(field)
                            || msg.contains("type")
                            || msg.contains("no `refresh_token`"),
                        "{field}={w}: {msg}"
                    );
                    assert!(!msg.contains("SECRET-VALUE"), "{msg}");
                }
            }
        }
    }
}

#[test]
fn random_and_truncated_configs_never_panic() {
    let example = include_str!("../config.toml");
    let env = |k: &str| (k == "HOME").then(|| "/nonexistent-home".to_string());
    tokenrelay::Config::from_toml(example, "config.toml", &env)
        .expect("the example config is valid");
    for cut in 0..example.len() {
        if example.is_char_boundary(cut) {
            if let Err(e) = tokenrelay::Config::from_toml(&example[..cut], "config.toml", &env) {
                assert!(e.to_string().starts_with("config.toml"), "{e}");
            }
        }
    }
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..1000 {
        let mut bytes = example.as_bytes().to_vec();
        for _ in 0..rng.random_range(1..6) {
            let i = rng.random_range(0..bytes.len());
            bytes[i] = rng.random_range(0x20..0x7f);
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = tokenrelay::Config::from_toml(&text, "config.toml", &env) {
            assert!(e.to_string().starts_with("config.toml"), "{e}");
        }
    }
}
