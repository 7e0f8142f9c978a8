//! Any bytes as a credential file: parse never panics; an error never echoes a value; a
//! parsed document survives a write-back round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match tokenrelay::store::shape::parse(data, 0) {
        Ok((_, mut doc)) => {
            let update = tokenrelay::store::shape::TokenUpdate {
                access_token: "fuzz-access".into(),
                expires_in_secs: 3600,
                refresh_token: Some("fuzz-refresh".into()),
                resource_url: None,
            };
            tokenrelay::store::shape::apply_update(&mut doc, &update, 0);
            let bytes = serde_json::to_vec(&doc).expect("a JSON object serialises");
            tokenrelay::store::shape::parse(&bytes, 0).expect("a written-back file parses again");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
