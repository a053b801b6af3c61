//! Bearer credentials: the session token from `Login` as `authorization: Bearer <token>`,
//! added by a tonic interceptor to every call of a [`Client`](crate::Client).
//!
//! The header value is built once, marked sensitive (so tonic's and http's `Debug` hide
//! it), and this type's own `Debug` shows only whether there is a token.

use std::fmt;

use secrecy::{ExposeSecret as _, SecretString};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::error::{Error, Result};

/// The metadata key the API reads credentials from.
const AUTHORIZATION: &str = "authorization";

/// What each call carries to authenticate: nothing (the default, for `Signup` and `Login`),
/// or a session token.
#[derive(Clone, Default)]
pub struct Credentials {
    bearer: Option<MetadataValue<Ascii>>,
}

impl Credentials {
    /// Calls that send `token` as `authorization: Bearer <token>`.
    pub fn bearer(token: &SecretString) -> Result<Credentials> {
        let mut value = MetadataValue::try_from(format!("Bearer {}", token.expose_secret()))
            .map_err(Error::MalformedToken)?;
        value.set_sensitive(true);
        Ok(Credentials {
            bearer: Some(value),
        })
    }

    /// `request` with these credentials; without a token it is left as it is, so a caller
    /// may still set its own header.
    pub fn authorize<T>(&self, mut request: Request<T>) -> Request<T> {
        if let Some(value) = &self.bearer {
            request.metadata_mut().insert(AUTHORIZATION, value.clone());
        }
        request
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        Ok(self.authorize(request))
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bearer = self.bearer.as_ref().map(|_| "<redacted>");
        f.debug_struct("Credentials")
            .field("bearer", &bearer)
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_token_travels_as_a_bearer_header() {
        let mut creds = Credentials::bearer(&SecretString::from("tok-123")).unwrap();
        let req = creds.call(Request::new(())).unwrap();
        assert_eq!(req.metadata().get(AUTHORIZATION).unwrap(), "Bearer tok-123");
        let req = creds.authorize(Request::new(7_u8));
        assert_eq!(req.metadata().get(AUTHORIZATION).unwrap(), "Bearer tok-123");
    }

    #[test]
    fn no_token_leaves_the_request_alone() {
        let mut req = Request::new(());
        req.metadata_mut()
            .insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        let req = Credentials::default().call(req).unwrap();
        assert_eq!(req.metadata().get(AUTHORIZATION).unwrap(), "Basic abc");
        assert!(
            Credentials::default()
                .authorize(Request::new(()))
                .metadata()
                .is_empty()
        );
    }

    #[test]
    fn the_token_stays_out_of_debug() {
        let creds = Credentials::bearer(&SecretString::from("tok-123")).unwrap();
        let debug = format!("{creds:?}");
        assert!(!debug.contains("tok-123"), "{debug}");
        assert!(debug.contains("redacted"), "{debug}");
        let req = creds.authorize(Request::new(()));
        let debug = format!("{req:?}");
        assert!(!debug.contains("tok-123"), "{debug}");
    }

    #[test]
    fn a_token_that_cannot_be_a_header_is_refused() {
        let e = Credentials::bearer(&SecretString::from("a\nb")).unwrap_err();
        assert!(matches!(e, Error::MalformedToken(_)), "{e:?}");
        assert!(!e.to_string().contains("a\nb"));
    }
}
