//! Vertex AI: hosts per location (`{location}-aiplatform.googleapis.com`, and
//! `aiplatform.googleapis.com` for `global`), chosen from the request's own path
//! (`…/projects/{p}/locations/{location}/…`) but only among configured locations, so the
//! host never comes from free client input. OAuth (ADC, service accounts) and
//! express-mode API keys (`x-goog-api-key`).

pub const UPSTREAM: &str = "https://{location}-aiplatform.googleapis.com";
pub const PLACEHOLDER: &str = "{location}";

/// Vertex AI's generative AI locations (Google Cloud documentation, "Generative AI on
/// Vertex AI locations"); `providers.vertex.locations` replaces the list.
pub const DEFAULT_LOCATIONS: &[&str] = &[
    "global",
    "us-central1",
    "us-east1",
    "us-east4",
    "us-east5",
    "us-south1",
    "us-west1",
    "us-west4",
    "northamerica-northeast1",
    "southamerica-east1",
    "europe-central2",
    "europe-north1",
    "europe-southwest1",
    "europe-west1",
    "europe-west2",
    "europe-west3",
    "europe-west4",
    "europe-west6",
    "europe-west8",
    "europe-west9",
    "asia-east1",
    "asia-east2",
    "asia-northeast1",
    "asia-northeast3",
    "asia-south1",
    "asia-southeast1",
    "australia-southeast1",
    "me-central1",
    "me-central2",
    "me-west1",
];

pub fn key_hint() -> String {
    "replace the express-mode key in providers.vertex.api_keys (Vertex AI Studio → API keys)"
        .to_string()
}

/// The location a Vertex path names (`/locations/{location}/`), if any.
pub fn path_location(path: &str) -> Option<&str> {
    let i = path.find("/locations/")?;
    let rest = &path[i + "/locations/".len()..];
    let end = rest.find(['/', '?', ':']).unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

/// The upstream base for `location` from a template with `{location}`: `global` drops
/// the `{location}-` prefix (`aiplatform.googleapis.com`).
pub fn base_for(template: &str, location: &str) -> String {
    if location == "global" {
        template.replace("{location}-", "").replace(PLACEHOLDER, "")
    } else {
        template.replace(PLACEHOLDER, location)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_come_from_the_path_and_global_has_no_prefix() {
        assert_eq!(
            path_location(
                "/v1/projects/p/locations/europe-west4/publishers/google/models/m:generateContent"
            ),
            Some("europe-west4")
        );
        assert_eq!(
            path_location("/v1/publishers/google/models/m:generateContent"),
            None
        );
        assert_eq!(
            base_for(UPSTREAM, "us-central1"),
            "https://us-central1-aiplatform.googleapis.com"
        );
        assert_eq!(
            base_for(UPSTREAM, "global"),
            "https://aiplatform.googleapis.com"
        );
    }
}
