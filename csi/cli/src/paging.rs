//! CSI list paging: ask for a page, then follow `next_token` until it is
//! empty.

use std::collections::HashSet;
use std::future::Future;

/// Upper bound on pages fetched by one listing (a guard against a server
/// that never ends the listing).
pub const MAX_PAGES: usize = 100_000;

/// Collects every entry of a paged listing. `fetch(token)` returns one page
/// and the token of the next one (empty: the last page). Fails if the server
/// hands back a token it already gave (the listing would never end).
pub async fn collect_pages<T, E, F, Fut>(mut fetch: F) -> Result<Vec<T>, E>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), E>>,
    E: From<PagingError>,
{
    let mut all = Vec::new();
    let mut seen = HashSet::new();
    let mut token = String::new();
    for _ in 0..MAX_PAGES {
        let (page, next) = fetch(token).await?;
        all.extend(page);
        if next.is_empty() {
            return Ok(all);
        }
        if !seen.insert(next.clone()) {
            return Err(PagingError::Loop(next).into());
        }
        token = next;
    }
    Err(PagingError::TooManyPages.into())
}

/// A listing that does not end.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PagingError {
    /// The server returned a page token twice.
    #[error("the driver returned page token {0:?} twice: the listing would never end")]
    Loop(String),
    /// More than [`MAX_PAGES`] pages.
    #[error("the driver's listing did not end after {MAX_PAGES} pages")]
    TooManyPages,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake of the CSI paging contract only: pages of `max` entries from a
    /// list; the token is the index of the next entry; an unknown token is
    /// ABORTED, as the spec says.
    struct FakeLister {
        items: Vec<u32>,
        max: usize,
        calls: std::cell::Cell<usize>,
    }

    impl FakeLister {
        async fn list(&self, token: String) -> Result<(Vec<u32>, String), tonic::Status> {
            self.calls.set(self.calls.get() + 1);
            let start = if token.is_empty() {
                0
            } else {
                token
                    .parse::<usize>()
                    .ok()
                    .filter(|&i| i < self.items.len())
                    .ok_or_else(|| tonic::Status::aborted("invalid starting_token"))?
            };
            let end = (start + self.max).min(self.items.len());
            let next = if end < self.items.len() {
                end.to_string()
            } else {
                String::new()
            };
            Ok((self.items[start..end].to_vec(), next))
        }
    }

    #[derive(Debug, PartialEq)]
    enum E {
        Rpc(tonic::Code),
        Paging(PagingError),
    }
    impl From<PagingError> for E {
        fn from(p: PagingError) -> E {
            E::Paging(p)
        }
    }

    async fn run(items: Vec<u32>, max: usize) -> (Result<Vec<u32>, E>, usize) {
        let fake = FakeLister {
            items,
            max,
            calls: 0.into(),
        };
        let r = collect_pages(|t| {
            let fut = fake.list(t);
            async move { fut.await.map_err(|s| E::Rpc(s.code())) }
        })
        .await;
        (r, fake.calls.get())
    }

    #[tokio::test]
    async fn follows_tokens_to_the_end() {
        let items: Vec<u32> = (0..7).collect();
        assert_eq!(run(items.clone(), 3).await, (Ok(items.clone()), 3));
        assert_eq!(run(items.clone(), 7).await, (Ok(items.clone()), 1));
        assert_eq!(run(items.clone(), 1).await, (Ok(items), 7));
        assert_eq!(run(vec![], 3).await, (Ok(vec![]), 1));
    }

    #[tokio::test]
    async fn a_repeated_token_stops_the_listing() {
        let mut calls = 0;
        let r: Result<Vec<u32>, E> = collect_pages(|_| {
            calls += 1;
            async { Ok((vec![1], "again".to_owned())) }
        })
        .await;
        assert_eq!(r, Err(E::Paging(PagingError::Loop("again".into()))));
        assert_eq!(calls, 2);
    }

    #[tokio::test]
    async fn a_failed_page_fails_the_listing() {
        let mut n = 0;
        let r: Result<Vec<u32>, E> = collect_pages(|_| {
            n += 1;
            let this = n;
            async move {
                if this == 2 {
                    Err(E::Rpc(tonic::Code::Aborted))
                } else {
                    Ok((vec![this], this.to_string()))
                }
            }
        })
        .await;
        assert_eq!(r, Err(E::Rpc(tonic::Code::Aborted)));
    }
}
