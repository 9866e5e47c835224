//! Per-index users (RBAC): mint, list, revoke. Root key only.

use std::sync::Arc;

use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};

use super::error::{responses, ApiError};
use super::{blocking, parse_kek, AppState, Credentials};
use crate::auth::{Action, Principal};
use crate::engine::Lease;
use crate::users::{Permission, Users};
use zeroize::Zeroizing;

#[derive(Tags)]
enum Tag {
    /// Per-index user keys (needs CYBORGDB_SERVICE_ROOT_KEY and the root key).
    Users,
}

/// Mint a user key for one index.
#[derive(Object)]
#[oai(rename = "CreateUserRequest")]
pub struct CreateUserRequest {
    /// Non-empty subset of `read` and `write`.
    pub permissions: Vec<String>,
    /// The index key (64 hex characters) of an index created with `index_key`.
    pub index_key: Option<String>,
}

super::wipe_key_on_drop!(CreateUserRequest);
super::redacted_debug!(CreateUserRequest, [permissions], [index_key]);

/// The new user. `api_key` is shown only here and never stored: keep it.
#[derive(Object)]
#[oai(rename = "CreateUserResponse")]
pub struct CreateUserResponse {
    /// 32 hexadecimal characters.
    pub user_id: String,
    /// `cdbk_…`; send it as `X-API-Key`. No index key is needed with it.
    pub api_key: String,
}

super::redacted_debug!(CreateUserResponse, [user_id], [api_key]);

#[derive(Object, Debug)]
#[oai(rename = "UserInfo")]
pub struct UserInfo {
    pub user_id: String,
    /// Derived from which grants exist for the user.
    pub permissions: Vec<String>,
}

#[derive(Object, Debug)]
#[oai(rename = "ListUsersResponse")]
pub struct ListUsersResponse {
    pub users: Vec<UserInfo>,
}

responses!(CreateUserResponseEnum, CreateUserResponse, [400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 404 => NotFound, 422 => Invalid, 502 => KmsFailure]);
responses!(ListUsersResponseEnum, ListUsersResponse, [400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 404 => NotFound, 422 => Invalid, 502 => KmsFailure]);
responses!(DeleteUserResponse, no_content, [400 => BadRequest, 401 => Unauthorized, 403 => Forbidden, 404 => NotFound, 422 => Invalid, 502 => KmsFailure]);

pub struct UsersApi {
    pub state: Arc<AppState>,
}

/// Root-only gate, then open the index with its key.
fn open_as_root<'a>(
    state: &'a AppState,
    creds: &Credentials,
    name: &str,
    key: Option<&str>,
) -> Result<(&'a Users, Lease), ApiError> {
    let p = state.auth.authenticate(creds.key())?;
    state.auth.require(&p, Action::ManageUsers)?;
    debug_assert!(matches!(p, Principal::Root));
    let users = state
        .auth
        .users()
        .ok_or_else(|| ApiError::forbidden("RBAC is not enabled"))?;
    let kek = state.resolve_kek(&p, name, parse_kek(key)?)?;
    Ok((users, state.engine.open(name, kek.as_ref())?))
}

/// The index key of GET/DELETE: `X-Index-Key` header, or the `index_key` query parameter.
fn header_or_query(header: Option<String>, query: Option<String>) -> Option<Zeroizing<String>> {
    let (header, query) = (header.map(Zeroizing::new), query.map(Zeroizing::new));
    header
        .filter(|h| !h.is_empty())
        .or(query.filter(|q| !q.is_empty()))
}

#[OpenApi]
impl UsersApi {
    /// Mint a user key scoped to one index with `read` and/or `write` permission.
    #[oai(
        path = "/indexes/:index_name/users",
        method = "post",
        operation_id = "create_user_v1_indexes__index_name__users_post",
        tag = "Tag::Users"
    )]
    async fn create_user(
        &self,
        creds: Credentials,
        index_name: Path<String>,
        body: Json<CreateUserRequest>,
    ) -> CreateUserResponseEnum {
        let state = self.state.clone();
        blocking(move || {
            let req = body.0;
            // Validate the body first: 400 for bad permissions whatever else is wrong.
            if req.permissions.is_empty() {
                return Err(ApiError::bad_request("permissions must be a non-empty subset of [\"read\", \"write\"]"));
            }
            let perms = req
                .permissions
                .iter()
                .map(|p| {
                    Permission::parse(p).ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "unknown permission '{p}': permissions must be a non-empty subset of [\"read\", \"write\"]"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let (users, ix) = open_as_root(&state, &creds, &index_name.0, req.index_key.as_deref())?;
            let (user_id, api_key) = users.mint(&ix.id, ix.dek(), &perms)?;
            tracing::info!(index = %ix.name, user = %user_id, "user created");
            Ok(CreateUserResponse {
                user_id,
                api_key: api_key.to_string(),
            })
        })
        .await
        .into()
    }

    /// List the users of an index and their permissions.
    #[oai(
        path = "/indexes/:index_name/users",
        method = "get",
        operation_id = "list_users_v1_indexes__index_name__users_get",
        tag = "Tag::Users"
    )]
    async fn list_users(
        &self,
        creds: Credentials,
        index_name: Path<String>,
        /// Index key (hex) of an index created with `index_key`.
        #[oai(name = "X-Index-Key")]
        x_index_key: Header<Option<String>>,
        /// Same as `X-Index-Key`, for older clients.
        index_key: Query<Option<String>>,
    ) -> ListUsersResponseEnum {
        let state = self.state.clone();
        blocking(move || {
            let key = header_or_query(x_index_key.0, index_key.0);
            let (users, ix) = open_as_root(
                &state,
                &creds,
                &index_name.0,
                key.as_deref().map(String::as_str),
            )?;
            Ok(ListUsersResponse {
                users: users
                    .list(&ix.id)?
                    .into_iter()
                    .map(|(user_id, perms)| UserInfo {
                        user_id,
                        permissions: perms.iter().map(|p| p.as_str().to_owned()).collect(),
                    })
                    .collect(),
            })
        })
        .await
        .into()
    }

    /// Revoke a user: its key stops working immediately, on every route.
    #[oai(
        path = "/indexes/:index_name/users/:user_id",
        method = "delete",
        operation_id = "delete_user_v1_indexes__index_name__users__user_id__delete",
        tag = "Tag::Users"
    )]
    async fn delete_user(
        &self,
        creds: Credentials,
        index_name: Path<String>,
        user_id: Path<String>,
        /// Index key (hex) of an index created with `index_key`.
        #[oai(name = "X-Index-Key")]
        x_index_key: Header<Option<String>>,
        /// Same as `X-Index-Key`, for older clients.
        index_key: Query<Option<String>>,
    ) -> DeleteUserResponse {
        let state = self.state.clone();
        blocking(move || {
            let key = header_or_query(x_index_key.0, index_key.0);
            let (users, ix) = open_as_root(
                &state,
                &creds,
                &index_name.0,
                key.as_deref().map(String::as_str),
            )?;
            users.revoke(&ix.id, &user_id.0)?;
            tracing::info!(index = %ix.name, user = %user_id.0, "user revoked");
            Ok(())
        })
        .await
        .into()
    }
}
