//! The one place where failures become HTTP statuses and `{"status_code", "detail"}` bodies.

use poem_openapi::Object;

use crate::engine::EngineError;
use crate::keys::KeyError;

/// The error body of every non-2xx response.
#[derive(Object, Debug, Clone, PartialEq)]
#[oai(rename = "ErrorResponseModel")]
pub struct ErrorBody {
    /// The HTTP status code, repeated for clients that only see the body.
    pub status_code: u16,
    /// What went wrong and, where it helps, how to fix it.
    pub detail: String,
}

/// A failure on its way to becoming a response.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: u16, detail: impl Into<String>) -> Self {
        Self {
            status,
            detail: detail.into(),
        }
    }
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(400, detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(401, detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(403, detail)
    }
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(422, detail)
    }
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(500, detail)
    }
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            status_code: self.status,
            detail: self.detail.clone(),
        }
    }

    /// Turn a request-parsing failure from poem-openapi into a 422 with a readable reason.
    pub fn from_parse(err: poem::Error) -> Self {
        use poem_openapi::error::{ContentTypeError, ParseRequestPayloadError};
        if err.is::<ContentTypeError>() {
            return Self::invalid(format!(
                "{err}; send the body as JSON with 'Content-Type: application/json'"
            ));
        }
        if let Some(e) = err.downcast_ref::<ParseRequestPayloadError>() {
            return Self::invalid(format!("invalid request body: {}", e.reason));
        }
        Self::invalid(format!("invalid request: {err}"))
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match &e {
            EngineError::NotFound(name) => Self::new(404, format!("Index '{name}' not found")),
            EngineError::AlreadyExists(name) => Self::new(
                409,
                format!(
                    "Index '{name}' already exists; pick another index_name or delete it first"
                ),
            ),
            EngineError::WrongKey(name) => {
                Self::unauthorized(format!("Wrong encryption key for index '{name}'"))
            }
            EngineError::MissingKey(_) => Self::unauthorized(e.to_string()),
            EngineError::BadRequest(_) => Self::bad_request(e.to_string()),
            EngineError::Invalid(_) => Self::invalid(e.to_string()),
            EngineError::Cancelled(r) => {
                use crate::engine::CancelReason as C;
                let status = match r {
                    C::Superseded | C::Busy => 409,
                    C::Deleted => 404,
                    C::Shutdown => 503,
                    C::TimeLimit(_) => 422,
                };
                Self::new(status, e.to_string())
            }
            EngineError::Integrity { .. } => {
                tracing::error!(error = %e, "integrity failure");
                Self::internal(format!("Internal server error: {e}"))
            }
            EngineError::Store(sealdb_plugin_api::StoreError::Unavailable(m)) => {
                tracing::warn!(error = %m, "store unavailable");
                Self::new(
                    503,
                    format!("Storage is unavailable ({m}); retry in a few seconds (retrying an upsert or delete is safe: it writes the same values again)"),
                )
            }
            EngineError::Store(sealdb_plugin_api::StoreError::Conflict(m)) => Self::new(
                503,
                format!("Other servers kept writing this index first ({m}); nothing of this request was written: retry"),
            ),
            EngineError::Store(_) | EngineError::Corrupt(_) => {
                tracing::error!(error = %e, "internal failure");
                Self::internal(format!("Internal server error: {e}"))
            }
        }
    }
}

impl From<crate::limits::OverLimit> for ApiError {
    fn from(e: crate::limits::OverLimit) -> Self {
        Self::invalid(e.to_string())
    }
}

impl From<crate::users::UserError> for ApiError {
    fn from(e: crate::users::UserError) -> Self {
        use crate::users::UserError as U;
        match e {
            U::Unauthenticated(m) => Self::unauthorized(m),
            U::Denied(m) => Self::forbidden(m),
            U::NotFound(_) => Self::new(404, e.to_string()),
            U::BadRequest(m) => Self::bad_request(m),
            U::Engine(e) => e.into(),
            U::Integrity(_) => {
                tracing::error!(error = %e, "user directory integrity failure");
                Self::internal(format!("Internal server error: {e}"))
            }
            U::Store(_) => {
                tracing::error!(error = %e, "user store failure");
                Self::internal(format!("Internal server error: {e}"))
            }
        }
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> Self {
        use crate::auth::AuthError as A;
        match e {
            A::Unauthenticated(m) => Self::unauthorized(m),
            A::Forbidden(m) => Self::forbidden(m),
            A::User(u) => u.into(),
            A::Engine(e) => e.into(),
        }
    }
}

impl From<crate::kms::KmsFailure> for ApiError {
    fn from(e: crate::kms::KmsFailure) -> Self {
        use crate::kms::KmsFailure as K;
        match e {
            K::UnknownSlot(..) => Self::bad_request(e.to_string()),
            _ => {
                tracing::warn!(error = %e, "KMS failure");
                Self::new(502, e.to_string())
            }
        }
    }
}

impl From<crate::embed::EmbedError> for ApiError {
    fn from(e: crate::embed::EmbedError) -> Self {
        use crate::embed::EmbedError as E;
        match e {
            E::Unknown(_) => Self::bad_request(e.to_string()),
            E::NotInstalled { .. } => Self::new(503, e.to_string()),
            E::Load(_) | E::Run(_) => {
                tracing::error!(error = %e, "embedding failure");
                Self::internal(e.to_string())
            }
        }
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::BadFormat(_) => Self::bad_request(e.to_string()),
            KeyError::Open => Self::unauthorized("Wrong encryption key"),
        }
    }
}

/// Declare one operation's response enum: its success response plus the error statuses it can
/// return. Every enum gets a 500 variant, which also receives any undeclared status (logged),
/// so the spec never under-declares what the server sends.
///
/// `responses!(Name, OkType, [400 => BadRequest, 404 => NotFound])` (200 with a JSON body), or
/// `responses!(Name, no_content, [...])` (204 with no body).
macro_rules! responses {
    ($name:ident, no_content, [$($code:tt => $var:ident),* $(,)?]) => {
        crate::api::error::responses!(@munch
            [$name, (), (/// Done; no content.
                #[oai(status = 204)] NoContent,), |_v| Self::NoContent, [$($code => $var),*]],
            [], [$($code => $var),*]);
    };
    ($name:ident, $ok:ty, [$($code:tt => $var:ident),* $(,)?]) => {
        crate::api::error::responses!(@munch
            [$name, $ok, (/// Success.
                #[oai(status = 200)] Ok(poem_openapi::payload::Json<$ok>),),
             |v| Self::Ok(poem_openapi::payload::Json(v)), [$($code => $var),*]],
            [], [$($code => $var),*]);
    };
    (@munch [$($head:tt)*], [$($acc:tt)*], [400 => $var:ident $(, $($rest:tt)*)?]) => {
        crate::api::error::responses!(@munch [$($head)*],
            [$($acc)* #[doc = "Bad request: conflicting or malformed parameters (see `detail`)."] #[oai(status = 400)] $var(poem_openapi::payload::Json<crate::api::error::ErrorBody>),],
            [$($($rest)*)?]);
    };
    (@munch [$($head:tt)*], [$($acc:tt)*], [401 => $var:ident $(, $($rest:tt)*)?]) => {
        crate::api::error::responses!(@munch [$($head)*],
            [$($acc)* #[doc = "Missing or invalid API key, or missing or wrong index key."] #[oai(status = 401)] $var(poem_openapi::payload::Json<crate::api::error::ErrorBody>),],
            [$($($rest)*)?]);
    };
    (@munch [$($head:tt)*], [$($acc:tt)*], [403 => $var:ident $(, $($rest:tt)*)?]) => {
        crate::api::error::responses!(@munch [$($head)*],
            [$($acc)* #[doc = "The API key is valid but not allowed to do this."] #[oai(status = 403)] $var(poem_openapi::payload::Json<crate::api::error::ErrorBody>),],
            [$($($rest)*)?]);
    };
    (@munch [$($head:tt)*], [$($acc:tt)*], [404 => $var:ident $(, $($rest:tt)*)?]) => {
        crate::api::error::responses!(@munch [$($head)*],
            [$($acc)* #[doc = "The index (or user) does not exist."] #[oai(status = 404)] $var(poem_openapi::payload::Json<crate::api::error::ErrorBody>),],
            [$($($rest)*)?]);
    };
    (@munch [$($head:tt)*], [$($acc:tt)*], [409 => $var:ident $(, $($rest:tt)*)?]) => {
        crate::api::error::responses!(@munch [$($head)*],
            [$($acc)* #[doc = "Conflict with the index's current state: it already exists, or (train) a newer train request took over."] #[oai(status = 409)] $var(poem_openapi::payload::Json<crate::api::error::ErrorBody>),],
            [$($($rest)*)?]);
    };
    (@munch [$($head:tt)*], [$($acc:tt)*], [422 => $var:ident $(, $($rest:tt)*)?]) => {
        crate::api::error::responses!(@munch [$($head)*],
            [$($acc)* #[doc = "The request failed validation (see `detail`)."] #[oai(status = 422)] $var(poem_openapi::payload::Json<crate::api::error::ErrorBody>),],
            [$($($rest)*)?]);
    };
    (@munch [$($head:tt)*], [$($acc:tt)*], [502 => $var:ident $(, $($rest:tt)*)?]) => {
        crate::api::error::responses!(@munch [$($head)*],
            [$($acc)* #[doc = "The key management service failed."] #[oai(status = 502)] $var(poem_openapi::payload::Json<crate::api::error::ErrorBody>),],
            [$($($rest)*)?]);
    };
    (@munch [$name:ident, $ok:ty, ($($okv:tt)*), |$v:ident| $okexpr:expr, [$($code:tt => $var:ident),*]], [$($variants:tt)*], []) => {
        #[derive(poem_openapi::ApiResponse, Debug)]
        #[oai(bad_request_handler = "crate::api::error::parse_failure")]
        // One value per request, moved once: the size of the success variant costs nothing.
        #[allow(clippy::large_enum_variant)]
        pub enum $name {
            $($okv)*
            $($variants)*
            /// The request body is larger than the server accepts (`--max-body-mb`).
            #[oai(status = 413)]
            PayloadTooLarge(poem_openapi::payload::Json<crate::api::error::ErrorBody>),
            /// Internal server error.
            #[oai(status = 500)]
            Internal(poem_openapi::payload::Json<crate::api::error::ErrorBody>),
            /// Not available now; try again shortly: the store cannot be reached or another
            /// server kept winning the race to write the index, an embedding model is not
            /// installed, or (train) the server is shutting down.
            #[oai(status = 503)]
            Unavailable(poem_openapi::payload::Json<crate::api::error::ErrorBody>),
        }

        impl From<crate::api::error::ApiError> for $name {
            fn from(e: crate::api::error::ApiError) -> Self {
                let body = poem_openapi::payload::Json(e.body());
                match e.status {
                    $($code => Self::$var(body),)*
                    413 => Self::PayloadTooLarge(body),
                    500 => Self::Internal(body),
                    503 => Self::Unavailable(body),
                    other => {
                        tracing::error!(status = other, detail = %e.detail, "undeclared status mapped to 500");
                        Self::Internal(poem_openapi::payload::Json(crate::api::error::ErrorBody {
                            status_code: 500,
                            detail: e.detail,
                        }))
                    }
                }
            }
        }

        impl From<Result<$ok, crate::api::error::ApiError>> for $name {
            fn from(r: Result<$ok, crate::api::error::ApiError>) -> Self {
                match r {
                    Ok($v) => $okexpr,
                    Err(e) => e.into(),
                }
            }
        }
    };
}
pub(crate) use responses;

/// Used by every response enum's `bad_request_handler`.
pub fn parse_failure<T: From<ApiError>>(err: poem::Error) -> T {
    ApiError::from_parse(err).into()
}
