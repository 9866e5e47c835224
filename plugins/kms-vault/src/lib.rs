//! KMS provider for HashiCorp Vault and OpenBao: the transit secrets engine, through `vaultrs`.
//!
//! Slot fields (YAML `kms.registry.<slot>`, `provider: vault`):
//!
//! | field | required | meaning |
//! |---|---|---|
//! | `address` | yes | `http(s)://host:port` of the Vault/OpenBao server |
//! | `key_name` | yes | transit key that wraps index KEKs (an AEAD type, e.g. the default `aes256-gcm96`) |
//! | `mount` | no (`transit`) | mount path of the transit engine |
//! | `token` | one of | a Vault token |
//! | `role_id`, `secret_id` | one of | AppRole credentials (login at start, again when the token is refused) |
//! | `approle_mount` | no (`approle`) | mount path of the AppRole auth method |
//! | `namespace` | no | Vault Enterprise / OpenBao namespace |
//! | `ca_cert` | no | PEM file of the CA that signed the server's certificate |
//! | `timeout_seconds` | no (`10`) | per-request timeout |
//!
//! Wrapping sends the KEK to `transit/encrypt/<key_name>` with the server's context as
//! `associated_data`, so the ciphertext authenticates the index it belongs to (AES-GCM AAD in
//! Vault). Vault's ciphertext `vault:v<N>:...` is stored as is; `N` is recorded as the key
//! version, and older versions keep decrypting after a rotation until the key's
//! `min_decryption_version` passes them.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use sealdb_plugin_api::kms::{only_known, optional, required, timeout_field, url_field};
use sealdb_plugin_api::{async_trait, KmsError, KmsProvider, SlotFields, Wrapped, Zeroizing};
use vaultrs::client::{Client as _, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

/// The provider name in YAML.
pub const NAME: &str = "vault";

const FIELDS: &[&str] = &[
    "address",
    "key_name",
    "mount",
    "token",
    "role_id",
    "secret_id",
    "approle_mount",
    "namespace",
    "ca_cert",
    "timeout_seconds",
];

enum Login {
    Token,
    AppRole {
        mount: String,
        role_id: Zeroizing<String>,
        secret_id: Zeroizing<String>,
    },
}

/// One Vault/OpenBao transit slot.
pub struct VaultProvider {
    settings: Settings,
    mount: String,
    key_name: String,
    key_id: String,
    login: Login,
    client: RwLock<Arc<VaultClient>>,
}

#[derive(Clone)]
struct Settings {
    address: String,
    namespace: Option<String>,
    ca_cert: Option<String>,
    timeout: Duration,
}

impl Settings {
    fn client(&self, token: &str) -> Result<VaultClient, KmsError> {
        let mut b = VaultClientSettingsBuilder::default();
        b.address(&self.address)
            .token(token)
            .timeout(Some(self.timeout))
            .namespace(self.namespace.clone());
        if let Some(ca) = &self.ca_cert {
            b.ca_certs(vec![ca.clone()]);
        }
        let s = b
            .build()
            .map_err(|e| KmsError::Config(format!("vault client settings: {e}")))?;
        VaultClient::new(s).map_err(|e| KmsError::Config(format!("vault client: {e}")))
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Map a vaultrs error to the contract's kinds, without echoing request bodies.
fn classify(e: ClientError, what: &str) -> KmsError {
    match e {
        ClientError::APIError { code, errors } => {
            let detail = errors.join("; ");
            match code {
                401 | 403 => KmsError::Denied(format!("{what}: vault answered {code}: {detail}")),
                400 if what == "decrypt" => {
                    KmsError::Unwrap(format!("vault answered {code}: {detail}"))
                }
                400 | 404 => KmsError::Config(format!("{what}: vault answered {code}: {detail}")),
                _ => KmsError::Unavailable(format!("{what}: vault answered {code}: {detail}")),
            }
        }
        ClientError::RestClientError { source } => {
            KmsError::Unavailable(format!("{what}: vault could not be reached: {source}"))
        }
        other => KmsError::Unavailable(format!("{what}: {other}")),
    }
}

/// `vault:v3:...` -> `3`.
fn version_of(ciphertext: &str) -> Option<&str> {
    let rest = ciphertext.strip_prefix("vault:v")?;
    let (v, _) = rest.split_once(':')?;
    v.bytes().all(|b| b.is_ascii_digit()).then_some(v)
}

impl VaultProvider {
    /// Build a provider from a slot's fields and log in (AppRole). Nothing is sent to the
    /// transit engine until the first wrap, unwrap or health call.
    pub async fn new(fields: &SlotFields) -> Result<Self, KmsError> {
        only_known(fields, FIELDS)?;
        required(fields, "address")?;
        let address = url_field(fields, "address")?
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_owned();
        if url_host_missing(&address) {
            return Err(KmsError::Config(
                "field 'address' has no host (expected http(s)://host:port)".into(),
            ));
        }
        let key_name = required(fields, "key_name")?.to_owned();
        let mount = optional(fields, "mount")
            .unwrap_or("transit")
            .trim_matches('/')
            .to_owned();
        let timeout = timeout_field(fields, 10)?;
        let ca_cert = optional(fields, "ca_cert").map(str::to_owned);
        if let Some(ca) = &ca_cert {
            if !std::path::Path::new(ca).is_file() {
                return Err(KmsError::Config(format!(
                    "field 'ca_cert': no such file {ca}"
                )));
            }
        }
        let settings = Settings {
            address,
            namespace: optional(fields, "namespace").map(str::to_owned),
            ca_cert,
            timeout,
        };
        let (login, token) = match (
            optional(fields, "token"),
            optional(fields, "role_id"),
            optional(fields, "secret_id"),
        ) {
            (Some(t), None, None) => (Login::Token, Zeroizing::new(t.to_owned())),
            (None, Some(r), Some(s)) => (
                Login::AppRole {
                    mount: optional(fields, "approle_mount")
                        .unwrap_or("approle")
                        .to_owned(),
                    role_id: Zeroizing::new(r.to_owned()),
                    secret_id: Zeroizing::new(s.to_owned()),
                },
                Zeroizing::new(String::new()),
            ),
            (Some(_), _, _) => {
                return Err(KmsError::Config(
                    "give either 'token' or 'role_id' with 'secret_id', not both".into(),
                ))
            }
            (None, None, None) => {
                return Err(KmsError::Config(
                    "field 'token' (or 'role_id' and 'secret_id' for AppRole) is required".into(),
                ))
            }
            (None, _, _) => {
                return Err(KmsError::Config(
                    "AppRole needs both 'role_id' and 'secret_id'".into(),
                ))
            }
        };
        let client = settings.client(&token)?;
        let p = Self {
            key_id: format!("{mount}/{key_name}"),
            settings,
            mount,
            key_name,
            login,
            client: RwLock::new(Arc::new(client)),
        };
        if matches!(p.login, Login::AppRole { .. }) {
            p.relogin().await?;
        }
        Ok(p)
    }

    fn client(&self) -> Arc<VaultClient> {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// AppRole: log in again and swap in a client with the new token. Token auth: nothing to do.
    async fn relogin(&self) -> Result<bool, KmsError> {
        let Login::AppRole {
            mount,
            role_id,
            secret_id,
        } = &self.login
        else {
            return Ok(false);
        };
        let anon = self.settings.client("")?;
        let auth = vaultrs::auth::approle::login(&anon, mount, role_id, secret_id)
            .await
            .map_err(|e| classify(e, "approle login"))?;
        let token = Zeroizing::new(auth.client_token);
        let mut fresh = self.settings.client("")?;
        fresh.set_token(&token);
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(true)
    }

    /// Run `op`; when Vault refuses the token and AppRole can get a new one, log in once and
    /// run it again.
    async fn with_relogin<T, F, Fut>(&self, op: F) -> Result<T, KmsError>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, KmsError>>,
    {
        match op(self.client()).await {
            Err(KmsError::Denied(_)) if self.relogin().await? => op(self.client()).await,
            other => other,
        }
    }
}

fn url_host_missing(address: &str) -> bool {
    let rest = address.split_once("://").map(|(_, r)| r).unwrap_or("");
    let host = rest.split(['/', ':']).next().unwrap_or("");
    host.is_empty()
}

#[async_trait]
impl KmsProvider for VaultProvider {
    fn provider(&self) -> &str {
        NAME
    }

    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn region(&self) -> &str {
        ""
    }

    async fn wrap(&self, kek: &[u8], context: &[u8]) -> Result<Wrapped, KmsError> {
        let plaintext = Zeroizing::new(b64().encode(kek));
        let ad = b64().encode(context);
        let resp = self
            .with_relogin(|c| {
                let (plaintext, ad) = (plaintext.clone(), ad.clone());
                async move {
                    let mut opts = vaultrs::api::transit::requests::EncryptDataRequest::builder();
                    opts.associated_data(ad);
                    vaultrs::transit::data::encrypt(
                        c.as_ref(),
                        &self.mount,
                        &self.key_name,
                        &plaintext,
                        Some(&mut opts),
                    )
                    .await
                    .map_err(|e| classify(e, "encrypt"))
                }
            })
            .await?;
        let key_version = version_of(&resp.ciphertext)
            .ok_or_else(|| {
                KmsError::Unavailable("vault returned a ciphertext without a version".into())
            })?
            .to_owned();
        Ok(Wrapped {
            ciphertext: resp.ciphertext.into_bytes(),
            key_version,
        })
    }

    async fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let ciphertext = std::str::from_utf8(wrapped)
            .ok()
            .filter(|c| version_of(c).is_some())
            .ok_or_else(|| KmsError::Unwrap("not a vault transit ciphertext".into()))?
            .to_owned();
        let ad = b64().encode(context);
        let resp = self
            .with_relogin(|c| {
                let (ciphertext, ad) = (ciphertext.clone(), ad.clone());
                async move {
                    let mut opts = vaultrs::api::transit::requests::DecryptDataRequest::builder();
                    opts.associated_data(ad);
                    vaultrs::transit::data::decrypt(
                        c.as_ref(),
                        &self.mount,
                        &self.key_name,
                        &ciphertext,
                        Some(&mut opts),
                    )
                    .await
                    .map_err(|e| classify(e, "decrypt"))
                }
            })
            .await?;
        let b64_plain = Zeroizing::new(resp.plaintext);
        b64()
            .decode(b64_plain.as_bytes())
            .map(Zeroizing::new)
            .map_err(|_| KmsError::Unwrap("vault returned a plaintext that is not base64".into()))
    }

    async fn health(&self) -> Result<(), KmsError> {
        // Reading the key proves reachability, credentials and that the key exists.
        self.with_relogin(|c| async move {
            vaultrs::transit::key::read(c.as_ref(), &self.mount, &self.key_name)
                .await
                .map(|_| ())
                .map_err(|e| classify(e, "read key"))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> SlotFields {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn versions_are_read_from_ciphertexts() {
        assert_eq!(version_of("vault:v1:abc"), Some("1"));
        assert_eq!(version_of("vault:v12:abc"), Some("12"));
        assert_eq!(version_of("vault:vx:abc"), None);
        assert_eq!(version_of("other"), None);
    }

    #[tokio::test]
    async fn bad_slots_name_the_field() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("key_name", "k"), ("token", "t")], "'address'"),
            (
                &[("address", "ftp://x"), ("key_name", "k"), ("token", "t")],
                "'address'",
            ),
            (
                &[("address", "http://"), ("key_name", "k"), ("token", "t")],
                "'address'",
            ),
            (&[("address", "http://h:1"), ("token", "t")], "'key_name'"),
            (&[("address", "http://h:1"), ("key_name", "k")], "'token'"),
            (
                &[
                    ("address", "http://h:1"),
                    ("key_name", "k"),
                    ("role_id", "r"),
                ],
                "'secret_id'",
            ),
            (
                &[
                    ("address", "http://h:1"),
                    ("key_name", "k"),
                    ("token", "t"),
                    ("tokn", "x"),
                ],
                "'tokn'",
            ),
            (
                &[
                    ("address", "http://h:1"),
                    ("key_name", "k"),
                    ("token", "t"),
                    ("ca_cert", "/no/such"),
                ],
                "'ca_cert'",
            ),
        ];
        for (f, want) in cases {
            let e = match VaultProvider::new(&fields(f)).await {
                Err(e) => e,
                Ok(_) => panic!("{f:?} was accepted"),
            };
            assert!(matches!(e, KmsError::Config(_)), "{e}");
            assert!(e.to_string().contains(want), "{f:?}: {e}");
        }
        let ok = VaultProvider::new(&fields(&[
            ("address", "http://127.0.0.1:1"),
            ("key_name", "k"),
            ("token", "t"),
        ]))
        .await
        .unwrap();
        assert_eq!(ok.key_id(), "transit/k");
        // Nothing listens on port 1: unavailable, not a config or denial error.
        assert!(matches!(ok.health().await, Err(KmsError::Unavailable(_))));
    }
}
