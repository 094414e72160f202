//! Body and header plumbing shared by the shims.
//!
//! Joining buffered chunks serves all three. The rest serves the shims built on the `http` 1.x
//! and `http-body` 1.x types (Axum and Tonic): collecting a body through a limit, replaying the
//! buffered start of an over-limit body before its unread rest, and converting header maps to
//! and from stored header lists.

use bytes::{Bytes, BytesMut};

/// Joins buffered chunks, `total` bytes in all, into one; without a copy when there is one.
pub(crate) fn concat(mut chunks: Vec<Bytes>, total: usize) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(total);
            for chunk in &chunks {
                all.extend_from_slice(chunk);
            }
            all.freeze()
        }
    }
}

#[cfg(any(
    feature = "axum-integration",
    feature = "tonic-integration",
    feature = "tonic-client"
))]
pub(crate) use self::http1::*;

#[cfg(any(
    feature = "axum-integration",
    feature = "tonic-integration",
    feature = "tonic-client"
))]
// The client layer uses `collect` only.
#[cfg_attr(
    not(any(feature = "axum-integration", feature = "tonic-integration")),
    allow(dead_code)
)]
mod http1 {
    use bytes::Bytes;
    use http::{HeaderMap, HeaderName, HeaderValue};
    use http_body::Body;
    use http_body_util::BodyExt;

    use super::concat;
    use crate::contract::STORED_HEADER;
    use crate::{Error, HeaderList};

    #[cfg(feature = "axum-integration")]
    pub(crate) use self::prefixed::Prefixed;

    /// The error type of the bodies the shims pass on.
    pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

    /// What [`collect`] read.
    pub(crate) enum Collected<B> {
        /// The whole body: its data, and its trailers if it sent any.
        Whole {
            data: Bytes,
            // The Axum layer does not keep HTTP trailers; the Tonic layer does.
            #[cfg_attr(not(feature = "tonic-integration"), allow(dead_code))]
            trailers: Option<HeaderMap>,
        },
        /// The data passed the limit: the chunks read so far (more than the limit in all),
        /// and the unread rest of the body.
        TooLarge {
            // Sent on by the Axum layer; the Tonic layer only needs to know.
            #[cfg_attr(not(feature = "axum-integration"), allow(dead_code))]
            prefix: Vec<Bytes>,
            #[cfg_attr(not(feature = "axum-integration"), allow(dead_code))]
            rest: B,
        },
        /// A frame failed.
        Failed(BoxError),
    }

    /// Reads `body` until it ends or its data passes `limit` bytes (`None`: no limit).
    /// Trailers are merged in the order they come.
    pub(crate) async fn collect<B>(mut body: B, limit: Option<usize>) -> Collected<B>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut size = 0usize;
        let mut trailers: Option<HeaderMap> = None;
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) => return Collected::Failed(e.into()),
            };
            match frame.into_data() {
                Ok(data) => {
                    size += data.len();
                    chunks.push(data);
                    if limit.is_some_and(|limit| size > limit) {
                        return Collected::TooLarge {
                            prefix: chunks,
                            rest: body,
                        };
                    }
                }
                Err(frame) => {
                    if let Ok(more) = frame.into_trailers() {
                        match &mut trailers {
                            Some(all) => all.extend(more),
                            None => trailers = Some(more),
                        }
                    }
                }
            }
        }
        Collected::Whole {
            data: concat(chunks, size),
            trailers,
        }
    }

    /// A body rebuilt from buffered parts: at most one data frame, then the trailers, if any
    /// (the Tonic layer's replays, the gRPC client's retried answers).
    #[cfg(any(feature = "tonic-integration", feature = "tonic-client"))]
    mod buffered {
        use std::convert::Infallible;
        use std::pin::Pin;
        use std::task::{Context, Poll};

        use bytes::Bytes;
        use http::HeaderMap;
        use http_body::{Body, Frame, SizeHint};
        /// The data (one frame, absent when empty) and the trailers of a buffered message, played back
        /// in that order. With neither it is an empty body, which tonic sends as a trailers-only
        /// response when the status is in the headers.
        #[derive(Debug, Default)]
        pub(crate) struct Buffered {
            data: Option<Bytes>,
            trailers: Option<HeaderMap>,
        }

        impl Buffered {
            pub(crate) fn new(data: Bytes, trailers: Option<HeaderMap>) -> Self {
                Buffered {
                    data: (!data.is_empty()).then_some(data),
                    trailers,
                }
            }
        }

        impl Body for Buffered {
            type Data = Bytes;
            type Error = Infallible;

            fn poll_frame(
                self: Pin<&mut Self>,
                _cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
                let this = self.get_mut();
                if let Some(data) = this.data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
            }

            fn is_end_stream(&self) -> bool {
                self.data.is_none() && self.trailers.is_none()
            }

            /// Never exact: hyper would turn an exact size into a `content-length` header, which a
            /// gRPC response from tonic does not have.
            fn size_hint(&self) -> SizeHint {
                let mut hint = SizeHint::new();
                hint.set_lower(self.data.as_ref().map_or(0, |d| d.len() as u64));
                hint
            }
        }
    }
    #[cfg(any(feature = "tonic-integration", feature = "tonic-client"))]
    pub(crate) use buffered::Buffered;

    #[cfg(feature = "axum-integration")]
    mod prefixed {
        use std::collections::VecDeque;
        use std::pin::Pin;
        use std::task::{Context, Poll};

        use bytes::Bytes;
        use http_body::{Body, Frame};

        use super::BoxError;

        /// The buffered start of an over-limit body
        /// ([`Collected::TooLarge`](super::Collected::TooLarge)), followed by the rest of it,
        /// unbuffered.
        pub(crate) struct Prefixed<B> {
            prefix: VecDeque<Bytes>,
            rest: B,
        }

        impl<B> Prefixed<B> {
            /// `prefix`, then `rest`.
            pub(crate) fn new(prefix: Vec<Bytes>, rest: B) -> Self {
                Prefixed {
                    prefix: prefix.into(),
                    rest,
                }
            }
        }

        impl<B> Body for Prefixed<B>
        where
            B: Body<Data = Bytes> + Unpin,
            B::Error: Into<BoxError>,
        {
            type Data = Bytes;
            type Error = BoxError;

            fn poll_frame(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                if let Some(chunk) = self.prefix.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                Pin::new(&mut self.rest)
                    .poll_frame(cx)
                    .map(|f| f.map(|r| r.map_err(Into::into)))
            }

            fn is_end_stream(&self) -> bool {
                self.prefix.is_empty() && self.rest.is_end_stream()
            }
        }
    }

    /// A header map as a stored list, in order, every entry kept.
    pub(crate) fn header_list(headers: &HeaderMap) -> HeaderList {
        headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    /// A stored list as a header map. A name or value that is not valid HTTP (a corrupt or
    /// foreign record) is skipped, with a warning, rather than failing the replay.
    pub(crate) fn header_map(list: &HeaderList) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(list.len());
        for (name, value) in list {
            match (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                (Ok(name), Ok(value)) => {
                    map.append(name, value);
                }
                _ => tracing::warn!(
                    header = %name,
                    "idempotency: a stored header is not a valid header and was not replayed"
                ),
            }
        }
        map
    }

    /// Marks a response whose record could not be stored: `Idempotency-Stored: false` (see
    /// the [`contract`](crate::contract) module docs).
    pub(crate) fn mark_unstored(headers: &mut HeaderMap, error: &Error) {
        tracing::warn!(
            error = %error,
            "idempotency: the response is sent but could not be stored; the key stays locked \
             until its lock timeout"
        );
        headers.insert(
            HeaderName::from_static(STORED_HEADER),
            HeaderValue::from_static("false"),
        );
    }
}
