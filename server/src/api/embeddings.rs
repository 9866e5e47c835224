//! `GET /v1/embedding-models`: the models this server can run for `embedding_model`.

use std::sync::Arc;

use poem_openapi::{Object, OpenApi, Tags};

use super::error::responses;
use super::{blocking, AppState, Credentials};
use crate::embed::MODELS;

#[derive(Tags)]
enum Tag {
    /// Server-side text embedding.
    Embeddings,
}

/// A text embedding model the server can use for `embedding_model`.
#[derive(Object, Debug)]
#[oai(rename = "EmbeddingModelInfo")]
pub struct EmbeddingModelInfo {
    /// Canonical name (`organisation/model`); the bare model name is accepted too, in any case.
    pub name: String,
    /// Length of each embedding; indexes created with this model use it as their dimension.
    pub dimension: i64,
    /// Longest input in tokens; longer texts are truncated.
    pub max_seq_length: i64,
    /// Whether the weights are installed here (otherwise requests that need the model get 503
    /// naming the command that installs it).
    pub installed: bool,
}

/// Every model of the table.
#[derive(Object, Debug)]
#[oai(rename = "EmbeddingModelListResponseModel")]
pub struct EmbeddingModelList {
    pub models: Vec<EmbeddingModelInfo>,
}

responses!(ListEmbeddingModelsResponse, EmbeddingModelList, [401 => Unauthorized]);

pub struct EmbeddingsApi {
    pub state: Arc<AppState>,
}

#[OpenApi]
impl EmbeddingsApi {
    /// List the embedding models this server can run (nothing is downloaded).
    #[oai(
        path = "/embedding-models",
        method = "get",
        operation_id = "list_embedding_models_v1_embedding_models_get",
        tag = "Tag::Embeddings"
    )]
    async fn list(&self, creds: Credentials) -> ListEmbeddingModelsResponse {
        let state = self.state.clone();
        blocking(move || {
            state.auth.authenticate(creds.key())?;
            Ok(EmbeddingModelList {
                models: MODELS
                    .iter()
                    .map(|m| EmbeddingModelInfo {
                        name: m.canonical(),
                        dimension: m.dimension as i64,
                        max_seq_length: m.max_seq_length as i64,
                        installed: state.embed.find(m).is_some(),
                    })
                    .collect(),
            })
        })
        .await
        .into()
    }
}
