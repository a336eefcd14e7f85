//! Answering a registry's 401: bearer tokens from the realm it names
//! (anonymous or with credentials), or basic authentication.

use std::collections::HashMap;

use super::client::{host_port, read_bounded, read_text, registry_err};
use super::Registry;
use crate::reference::{is_loopback_host, Reference};
use crate::ImageError;

/// What to send with a repository's requests once authenticated.
#[derive(Debug, Clone)]
pub(super) enum Auth {
    Bearer(String),
    Basic,
}

impl Registry {
    /// Answer a 401 challenge.
    pub(super) async fn authenticate(
        &self,
        r: &Reference,
        challenge: &str,
    ) -> Result<Auth, ImageError> {
        let cred = self.config.credential(&r.registry);
        let (scheme, params) = parse_challenge(challenge);
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => match cred {
                Some(_) => Ok(Auth::Basic),
                None => Err(registry_err(
                    r,
                    "the registry wants basic credentials and none are configured (docker login, or $KILN_REGISTRY_CONFIG)".into(),
                )),
            },
            "bearer" => {
                let realm = params.get("realm").ok_or_else(|| {
                    registry_err(r, format!("bearer challenge without a realm: {challenge:?}"))
                })?;
                let mut url = reqwest::Url::parse(realm).map_err(|e| {
                    registry_err(r, format!("bad token realm {realm:?}: {e}"))
                })?;
                let realm_host = host_port(&url);
                match url.scheme() {
                    "https" => {}
                    "http"
                        if is_loopback_host(&realm_host)
                            || self.config.insecure.contains(&realm_host) => {}
                    _ => {
                        return Err(registry_err(
                            r,
                            format!("refusing token realm {realm} (not https)"),
                        ))
                    }
                }
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = params.get("service") {
                        q.append_pair("service", s);
                    }
                    q.append_pair("scope", &format!("repository:{}:pull", r.repository));
                }
                let mut req = self.http.get(url.clone());
                if let Some(c) = cred {
                    req = req.basic_auth(&c.username, Some(&c.password));
                }
                let resp = req.send().await.map_err(|e| ImageError::Registry {
                    reference: r.to_string(),
                    detail: format!("token request to {realm} failed"),
                    source: Some(Box::new(e)),
                })?;
                if !resp.status().is_success() {
                    let status = resp.status();
                    return Err(registry_err(
                        r,
                        format!(
                            "token request to {realm}: {status}: {}",
                            read_text(resp).await
                        ),
                    ));
                }
                let body = read_bounded(resp, 1 << 20)
                    .await
                    .map_err(|e| registry_err(r, format!("token response: {e}")))?;
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Token = serde_json::from_slice(&body)
                    .map_err(|e| registry_err(r, format!("token response from {realm}: {e}")))?;
                let token = t
                    .token
                    .or(t.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| registry_err(r, format!("no token in the response from {realm}")))?;
                tracing::debug!("{r}: got a bearer token from {realm}");
                Ok(Auth::Bearer(token))
            }
            _ => Err(registry_err(
                r,
                format!("unauthorized, with an unsupported challenge {challenge:?}"),
            )),
        }
    }
}

/// `Bearer realm="x",service="y"` → ("Bearer", {realm: x, service: y}).
pub fn parse_challenge(h: &str) -> (String, HashMap<String, String>) {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n)
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                value.push(*c);
                chars.next();
            }
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    (scheme.to_string(), params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:samalba/my-app:pull,push");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(s, "Basic");
        assert_eq!(p["realm"], "Registry Realm");
        let (_, p) = parse_challenge("Bearer realm=http://x/t, service=s");
        assert_eq!(p["realm"], "http://x/t");
        assert_eq!(p["service"], "s");
        assert!(parse_challenge("").1.is_empty());
    }
}
