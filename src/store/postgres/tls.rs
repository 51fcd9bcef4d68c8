//! TLS to PostgreSQL, read from the `postgres://` URL as libpq reads it: `sslmode`,
//! `sslrootcert`, `sslcert` and `sslkey`. tokio-postgres knows only `disable`, `prefer` and
//! `require`, and nothing of the files, so these are taken out of the URL here.
//!
//! fencegate never uses TLS without verifying the server: `require`, `verify-ca` and
//! `verify-full` all mean libpq's `verify-full` (the chain up to `sslrootcert`, or the system's
//! roots, and the host name). `prefer` and `allow` are refused: TLS that anyone on the path can
//! downgrade protects nothing. Without `sslmode` (or with `disable`) the connection is plain, as
//! before.

use std::path::PathBuf;

use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;

/// A `postgres://` URL split into what tokio-postgres reads and the TLS it cannot.
pub(crate) struct PostgresUrl {
    /// The URL without the TLS parameters.
    pub url: String,
    /// The connector, when the URL asks for TLS.
    pub tls: Option<MakeRustlsConnect>,
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresUrl")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// The TLS parameters of a URL's query, and the rest of it.
#[derive(Debug, Default, PartialEq, Eq)]
struct TlsParams {
    mode: Option<String>,
    root_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

pub(crate) fn parse(url: &str) -> Result<PostgresUrl, StoreError> {
    let (rest, params) = split_tls_params(url);
    let bad = |cause: String| StoreError::PostgresUrl { cause };
    let verify = match params.mode.as_deref() {
        None | Some("disable") => false,
        Some("require" | "verify-ca" | "verify-full") => true,
        Some(mode @ ("prefer" | "allow")) => {
            return Err(bad(format!(
                "sslmode={mode} lets anyone on the path turn TLS off; use sslmode=verify-full (or disable)"
            )));
        }
        Some(other) => return Err(bad(format!("sslmode={other:?} is not a libpq sslmode"))),
    };
    if !verify {
        if params != TlsParams::default() && params.mode.as_deref() != Some("disable") {
            return Err(bad(
                "sslrootcert, sslcert and sslkey need sslmode=verify-full".into(),
            ));
        }
        return Ok(PostgresUrl {
            url: rest,
            tls: None,
        });
    }
    let identity = match (&params.cert, &params.key) {
        (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
        (None, None) => None,
        _ => return Err(bad("sslcert and sslkey go together".into())),
    };
    let config = crate::tls::client_config(params.root_cert.as_deref(), identity)
        .map_err(|e| bad(e.to_string()))?;
    // tokio-postgres must still ask the server for TLS, and fail if it cannot have it.
    let url = with_param(&rest, "sslmode", "require");
    Ok(PostgresUrl {
        url,
        tls: Some(MakeRustlsConnect::new(config)),
    })
}

/// `url` without its TLS query parameters, and those parameters. A key/value connection string
/// (not a URL) is left as it is: its TLS options are tokio-postgres's to read.
fn split_tls_params(url: &str) -> (String, TlsParams) {
    let mut params = TlsParams::default();
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), params);
    };
    let mut kept = form_urlencoded::Serializer::new(String::new());
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let value = value.into_owned();
        match &*key {
            "sslmode" => params.mode = Some(value),
            "sslrootcert" => params.root_cert = Some(value.into()),
            "sslcert" => params.cert = Some(value.into()),
            "sslkey" => params.key = Some(value.into()),
            _ => {
                kept.append_pair(&key, &value);
            }
        }
    }
    let kept = kept.finish();
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{kept}")
    };
    (rest, params)
}

fn with_param(url: &str, key: &str, value: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{key}={value}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_parameters_come_out_of_the_url_and_the_rest_stays() {
        let (rest, params) = split_tls_params(
            "postgres://fg@db:5432/fg?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
        );
        assert_eq!(
            rest,
            "postgres://fg@db:5432/fg?application_name=x&connect_timeout=3"
        );
        assert_eq!(params.mode.as_deref(), Some("verify-full"));
        assert_eq!(params.root_cert, Some(PathBuf::from("/etc/ca.pem")));
    }

    #[test]
    fn only_verified_tls_or_none_is_taken() {
        assert!(parse("postgres://fg@db/fg").unwrap().tls.is_none());
        assert!(
            parse("postgres://fg@db/fg?sslmode=disable")
                .unwrap()
                .tls
                .is_none()
        );
        let verified = parse("postgres://fg@db/fg?sslmode=verify-full").unwrap();
        assert!(verified.tls.is_some());
        assert_eq!(verified.url, "postgres://fg@db/fg?sslmode=require");
        for refused in [
            "postgres://fg@db/fg?sslmode=prefer",
            "postgres://fg@db/fg?sslmode=allow",
            "postgres://fg@db/fg?sslmode=sometimes",
            "postgres://fg@db/fg?sslrootcert=/etc/ca.pem",
            "postgres://fg@db/fg?sslmode=verify-full&sslcert=/etc/c.pem",
            "postgres://fg@db/fg?sslmode=verify-full&sslrootcert=/nowhere/ca.pem",
        ] {
            assert!(
                matches!(parse(refused), Err(StoreError::PostgresUrl { .. })),
                "{refused}"
            );
        }
    }
}
