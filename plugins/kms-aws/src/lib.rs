//! KMS provider for AWS KMS (and any endpoint that speaks its API): `Encrypt`/`Decrypt` of the
//! index KEK under a customer master key, with an encryption context naming the index.
//!
//! Slot fields (YAML `kms.registry.<slot>`, `provider: aws-kms`), as the original service's:
//!
//! | field | required | meaning |
//! |---|---|---|
//! | `key_id` | yes | key id, key ARN, alias name (`alias/x`) or alias ARN |
//! | `region` | yes | AWS region of the key |
//! | `role_arn` | no | assume this role (STS AssumeRole) before calling KMS |
//! | `external_id` | with `role_arn` | the role's external id |
//! | `role_session_name` | no (`sealdb`) | session name, shown in the key owner's CloudTrail |
//! | `endpoint` | no | endpoint URL (otherwise `AWS_ENDPOINT_URL[_KMS]`, otherwise AWS) |
//! | `timeout_seconds` | no (`10`) | per-operation timeout |
//!
//! Credentials come from the standard AWS chain (environment, profile, container or instance
//! role), never from the slot, so none has to sit in the YAML file.
//!
//! The encryption context is `{"sealdb:context": hex(context)}`: KMS authenticates it with the
//! ciphertext, so a wrapped KEK copied to another index does not decrypt.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use sealdb_plugin_api::kms::{only_known, optional, required, timeout_field, url_field};
use sealdb_plugin_api::{async_trait, KmsError, KmsProvider, SlotFields, Wrapped, Zeroizing};

/// The provider name in YAML.
pub const NAME: &str = "aws-kms";

const FIELDS: &[&str] = &[
    "key_id",
    "region",
    "role_arn",
    "external_id",
    "role_session_name",
    "endpoint",
    "timeout_seconds",
];

const CONTEXT_KEY: &str = "sealdb:context";

/// One AWS KMS slot.
pub struct AwsKmsProvider {
    client: aws_sdk_kms::Client,
    key_id: String,
    region: String,
}

/// Map an SDK error to the contract's kinds. Only the service's error code and message are
/// kept (they never carry plaintext).
fn classify<E, R>(e: SdkError<E, R>, what: &str) -> KmsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match &e {
        SdkError::TimeoutError(_) => KmsError::Unavailable(format!("{what}: timed out")),
        SdkError::DispatchFailure(d) => {
            KmsError::Unavailable(format!("{what}: AWS KMS could not be reached: {d:?}"))
        }
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => {
            let code = e.code().unwrap_or("unknown").to_owned();
            let msg = e.message().unwrap_or("").to_owned();
            let text = format!("{what}: {code}: {msg}");
            match code.as_str() {
                "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "ExpiredTokenException"
                | "DisabledException"
                | "KMSInvalidStateException"
                | "KeyUnavailableException" => KmsError::Denied(text),
                "InvalidCiphertextException" | "IncorrectKeyException" => KmsError::Unwrap(text),
                "NotFoundException" | "InvalidKeyUsageException" | "ValidationException" => {
                    KmsError::Config(text)
                }
                _ => KmsError::Unavailable(text),
            }
        }
        _ => KmsError::Unavailable(format!("{what}: {e}")),
    }
}

impl AwsKmsProvider {
    /// Build a provider from a slot's fields. Credentials are resolved lazily by the SDK;
    /// nothing is sent to KMS until the first call.
    pub async fn new(fields: &SlotFields) -> Result<Self, KmsError> {
        only_known(fields, FIELDS)?;
        let key_id = required(fields, "key_id")?.to_owned();
        let region = required(fields, "region")?.to_owned();
        if !region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(KmsError::Config(format!(
                "field 'region': '{region}' is not an AWS region name"
            )));
        }
        let external_id = optional(fields, "external_id");
        let role_arn = optional(fields, "role_arn");
        if external_id.is_some() && role_arn.is_none() {
            return Err(KmsError::Config(
                "field 'external_id' needs 'role_arn'".into(),
            ));
        }
        let timeout = timeout_field(fields, 10)?;
        let endpoint = url_field(fields, "endpoint")?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region.clone()))
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(timeout)
                    .connect_timeout(Duration::from_secs(3).min(timeout))
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(2));
        if let Some(ep) = endpoint {
            loader = loader.endpoint_url(ep);
        }
        let base = loader.load().await;
        let conf = match role_arn {
            None => base,
            Some(role) => {
                let mut b = aws_config::sts::AssumeRoleProvider::builder(role)
                    .session_name(optional(fields, "role_session_name").unwrap_or("sealdb"))
                    .region(Region::new(region.clone()))
                    .configure(&base);
                if let Some(x) = external_id {
                    b = b.external_id(x);
                }
                let creds = b.build().await;
                base.into_builder()
                    .credentials_provider(aws_sdk_kms::config::SharedCredentialsProvider::new(
                        creds,
                    ))
                    .build()
            }
        };
        Ok(Self {
            client: aws_sdk_kms::Client::new(&conf),
            key_id,
            region,
        })
    }
}

#[async_trait]
impl KmsProvider for AwsKmsProvider {
    fn provider(&self) -> &str {
        NAME
    }

    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn region(&self) -> &str {
        &self.region
    }

    async fn wrap(&self, kek: &[u8], context: &[u8]) -> Result<Wrapped, KmsError> {
        let out = self
            .client
            .encrypt()
            .key_id(&self.key_id)
            .plaintext(Blob::new(kek.to_vec()))
            .encryption_context(CONTEXT_KEY, hex::encode(context))
            .send()
            .await
            .map_err(|e| classify(e, "Encrypt"))?;
        let ciphertext = out
            .ciphertext_blob()
            .ok_or_else(|| KmsError::Unavailable("Encrypt returned no ciphertext".into()))?
            .as_ref()
            .to_vec();
        Ok(Wrapped {
            ciphertext,
            // AWS rotates key material behind one key id and picks the version itself; the
            // key ARN it answered with is what identifies the wrap.
            key_version: out.key_id().unwrap_or("").to_owned(),
        })
    }

    async fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let out = self
            .client
            .decrypt()
            .key_id(&self.key_id)
            .ciphertext_blob(Blob::new(wrapped.to_vec()))
            .encryption_context(CONTEXT_KEY, hex::encode(context))
            .send()
            .await
            .map_err(|e| classify(e, "Decrypt"))?;
        let plain = out
            .plaintext
            .ok_or_else(|| KmsError::Unwrap("Decrypt returned no plaintext".into()))?;
        Ok(Zeroizing::new(plain.into_inner()))
    }

    async fn health(&self) -> Result<(), KmsError> {
        let out = self
            .client
            .describe_key()
            .key_id(&self.key_id)
            .send()
            .await
            .map_err(|e| classify(e, "DescribeKey"))?;
        match out.key_metadata().map(|m| m.enabled()) {
            Some(true) => Ok(()),
            _ => Err(KmsError::Denied(format!(
                "key '{}' is disabled",
                self.key_id
            ))),
        }
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

    #[tokio::test]
    async fn bad_slots_name_the_field() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("region", "us-east-1")], "'key_id'"),
            (&[("key_id", "k")], "'region'"),
            (&[("key_id", "k"), ("region", "US East")], "'region'"),
            (
                &[
                    ("key_id", "k"),
                    ("region", "us-east-1"),
                    ("external_id", "x"),
                ],
                "'external_id'",
            ),
            (
                &[
                    ("key_id", "k"),
                    ("region", "us-east-1"),
                    ("endpoint", "localhost"),
                ],
                "'endpoint'",
            ),
            (
                &[("key_id", "k"), ("region", "us-east-1"), ("keyid", "k")],
                "'keyid'",
            ),
        ];
        for (f, want) in cases {
            let e = match AwsKmsProvider::new(&fields(f)).await {
                Err(e) => e,
                Ok(_) => panic!("{f:?} was accepted"),
            };
            assert!(matches!(e, KmsError::Config(_)), "{e}");
            assert!(e.to_string().contains(want), "{f:?}: {e}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_unavailable() {
        // Static test credentials, and never the instance-metadata service.
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        let p = AwsKmsProvider::new(&fields(&[
            ("key_id", "alias/x"),
            ("region", "us-east-1"),
            ("endpoint", "http://127.0.0.1:1"),
            ("timeout_seconds", "2"),
        ]))
        .await
        .unwrap();
        assert_eq!((p.key_id(), p.region()), ("alias/x", "us-east-1"));
        let e = p.wrap(&[7; 32], b"ctx").await.unwrap_err();
        assert!(matches!(e, KmsError::Unavailable(_)), "{e}");
    }
}
