//! `lazylayer cri-proxy`: the kubelet's image service, in front of containerd's, keeping the
//! registry credentials of each pull for the snapshotter's lazy reads.
//!
//! containerd does not pass a pull's credentials to snapshotters, so under Kubernetes a private
//! image's layers could be mounted but not read. The kubelet is pointed at this proxy for images
//! (`--image-service-endpoint`) and at containerd for everything else; every ImageService call is
//! forwarded unchanged to containerd's CRI plugin (containerd still does the pull), and the
//! `AuthConfig` of each PullImage is kept in memory, by `registry/repository`. The snapshotter
//! (`--cri-proxy SOCKET`) asks for an image's credentials each time it resolves that image, over
//! a small gRPC service on the same socket, and keeps them only in the registry client of that
//! image, which renews its tokens with them.
//!
//! Trade-offs:
//! - The credentials live in a process of their own, so a snapshotter restart (or upgrade) finds
//!   them again; a restart of the proxy forgets them until the kubelet's next pull of the image
//!   (which it makes for every pod with `imagePullPolicy: Always`, and for every new image).
//!   Nothing is written to disk, logged, or put in an error message.
//! - Keyed by repository, not by tag: every tag and digest of a repository is read with the last
//!   credentials a pull of it carried, as the registry scopes its tokens per repository.
//! - An `AuthConfig` naming a `server_address` of another registry is not kept (containerd
//!   ignores it too). `username`/`password` and `auth` (base64 `user:password`) are used;
//!   `identity_token` and `registry_token` are not (the kubelet's credential providers for the
//!   big clouds hand out a user name and a token-as-password).
//! - Both sockets are the proxy's one Unix socket, mode 0600: whoever can reach it is root.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use k8s_cri::v1 as cri;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::model::reference::ImageRef;
use crate::source::config::Credentials;

/// The snapshotter's question: the credentials for an image reference.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CredentialsRequest {
    #[prost(string, tag = "1")]
    pub image: String,
}

/// The proxy's answer; `found` false when no pull of the image's repository carried any.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CredentialsResponse {
    #[prost(bool, tag = "1")]
    pub found: bool,
    #[prost(string, tag = "2")]
    pub username: String,
    #[prost(string, tag = "3")]
    pub password: String,
}

include!(concat!(env!("OUT_DIR"), "/lazylayer.cri.v1.Credentials.rs"));

#[derive(Debug, thiserror::Error)]
pub enum CriProxyError {
    #[error("cannot reach containerd's CRI image service at {}: {reason} (is containerd running with its CRI plugin?)", address.display())]
    Backend {
        address: std::path::PathBuf,
        reason: String,
    },
    #[error("cannot serve on {}: {source}", address.display())]
    Serve {
        address: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot ask lazylayer cri-proxy at {} for the credentials of {image}: {reason}", address.display())]
    Ask {
        address: std::path::PathBuf,
        image: String,
        reason: String,
    },
}

/// `registry/repository` of a reference, how credentials are kept; `None` for what is not a
/// registry reference.
fn repository_key(image: &str) -> Option<String> {
    match ImageRef::parse(image).ok()? {
        ImageRef::Registry(r) => Some(format!("{}/{}", r.registry, r.repository)),
        _ => None,
    }
}

/// The credentials an `AuthConfig` gives for `image`, as containerd reads it.
fn credentials_of(auth: &cri::AuthConfig, image: &str) -> Option<Credentials> {
    if !auth.server_address.is_empty() {
        let ImageRef::Registry(r) = ImageRef::parse(image).ok()? else {
            return None;
        };
        let named = auth
            .server_address
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default();
        let hub = |h: &str| matches!(h, "docker.io" | "index.docker.io" | "registry-1.docker.io");
        if named != r.registry && !(hub(named) && hub(&r.registry)) {
            return None;
        }
    }
    if !auth.username.is_empty() {
        return Some(Credentials {
            username: auth.username.clone(),
            password: auth.password.clone(),
        });
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.auth.trim())
        .ok()?;
    let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    (!user.is_empty()).then(|| Credentials {
        username: user.to_string(),
        password: password.to_string(),
    })
}

/// The proxy: containerd's image service behind it, and the credentials its pulls carried.
#[derive(Clone)]
pub struct CriProxy {
    backend: cri::image_service_client::ImageServiceClient<Channel>,
    credentials: Arc<Mutex<HashMap<String, Credentials>>>,
}

#[tonic::async_trait]
impl cri::image_service_server::ImageService for CriProxy {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        self.backend.clone().list_images(request).await
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        self.backend.clone().image_status(request).await
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let pull = request.get_ref();
        let image = pull
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        let kept = pull.auth.as_ref().and_then(|auth| {
            let kept = credentials_of(auth, &image);
            if kept.is_none() {
                // Said without the AuthConfig's content; containerd's own pull decides the rest.
                tracing::warn!(image, "the pull's credentials are not usable for lazy reads (an auth that is not base64 USER:PASSWORD, a token only, or another registry's server_address); the image is read with the snapshotter's own");
            }
            kept
        });
        // Kept before the pull: the snapshotter asks while containerd unpacks.
        if let (Some(key), Some(credentials)) = (repository_key(&image), kept) {
            tracing::debug!(repository = %key, "keeping the credentials of a pull");
            self.credentials.lock().unwrap().insert(key, credentials);
        }
        self.backend.clone().pull_image(request).await
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        self.backend.clone().remove_image(request).await
    }

    async fn image_fs_info(
        &self,
        request: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        self.backend.clone().image_fs_info(request).await
    }
}

#[tonic::async_trait]
impl credentials_server::Credentials for CriProxy {
    async fn get(
        &self,
        request: Request<CredentialsRequest>,
    ) -> Result<Response<CredentialsResponse>, Status> {
        let found = repository_key(&request.get_ref().image)
            .and_then(|key| self.credentials.lock().unwrap().get(&key).cloned());
        Ok(Response::new(match found {
            Some(c) => CredentialsResponse {
                found: true,
                username: c.username,
                password: c.password,
            },
            None => CredentialsResponse::default(),
        }))
    }
}

/// Serves the proxy on `address` (mode 0600) in front of containerd at `backend`, until
/// `shutdown`.
pub async fn serve(
    address: &Path,
    backend: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CriProxyError> {
    let channel =
        containerd_client::connect(backend)
            .await
            .map_err(|e| CriProxyError::Backend {
                address: backend.to_path_buf(),
                reason: e.to_string(),
            })?;
    let proxy = CriProxy {
        backend: cri::image_service_client::ImageServiceClient::new(channel),
        credentials: Arc::default(),
    };
    let serve_error = |source| CriProxyError::Serve {
        address: address.to_path_buf(),
        source,
    };
    // Owner-only, as a mount's control socket: the same binding serves both.
    let listener = crate::mount::control::bind(address).map_err(serve_error)?;
    let incoming = tonic::codegen::tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(cri::image_service_server::ImageServiceServer::new(
            proxy.clone(),
        ))
        .add_service(credentials_server::CredentialsServer::new(proxy))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| serve_error(std::io::Error::other(e)))
}

/// Asks the proxy at `address` for the credentials of `image`'s repository.
pub async fn credentials_for(
    address: &Path,
    image: &str,
) -> Result<Option<Credentials>, CriProxyError> {
    let failed = |reason: String| CriProxyError::Ask {
        address: address.to_path_buf(),
        image: image.to_string(),
        reason,
    };
    let channel = containerd_client::connect(address)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let answer = credentials_client::CredentialsClient::new(channel)
        .get(CredentialsRequest {
            image: image.to_string(),
        })
        .await
        .map_err(|e| failed(e.message().to_string()))?
        .into_inner();
    Ok(answer.found.then_some(Credentials {
        username: answer.username,
        password: answer.password,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(user: &str, password: &str, encoded: &str, server: &str) -> cri::AuthConfig {
        cri::AuthConfig {
            username: user.into(),
            password: password.into(),
            auth: encoded.into(),
            server_address: server.into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_auth_config_gives_credentials_as_containerd_reads_it() {
        let image = "registry.example:5000/team/app:1";
        let got = credentials_of(&auth("bob", "pw", "", ""), image).unwrap();
        assert_eq!(
            (got.username.as_str(), got.password.as_str()),
            ("bob", "pw")
        );
        let encoded = base64::engine::general_purpose::STANDARD.encode("amy:s3:cret");
        let got = credentials_of(&auth("", "", &encoded, ""), image).unwrap();
        assert_eq!(
            (got.username.as_str(), got.password.as_str()),
            ("amy", "s3:cret")
        );
        // For this registry, with or without a scheme; not for another one.
        assert!(
            credentials_of(
                &auth("bob", "pw", "", "https://registry.example:5000"),
                image
            )
            .is_some()
        );
        assert!(credentials_of(&auth("bob", "pw", "", "other.example"), image).is_none());
        // Docker Hub's many names.
        let hub = credentials_of(
            &auth("bob", "pw", "", "https://index.docker.io/v1/"),
            "nginx",
        );
        assert!(hub.is_some());
        assert!(credentials_of(&auth("", "", "", ""), image).is_none());
        assert!(credentials_of(&auth("", "", "not base64!", ""), image).is_none());
    }

    #[test]
    fn credentials_are_kept_per_repository() {
        assert_eq!(
            repository_key("nginx:1.25").as_deref(),
            Some("docker.io/library/nginx")
        );
        assert_eq!(
            repository_key(
                "docker.io/library/nginx@sha256:0000000000000000000000000000000000000000000000000000000000000000"
            ),
            Some("docker.io/library/nginx".to_string())
        );
        assert_eq!(repository_key("oci:/layout:tag"), None);
    }
}
