//! Chat calls: whole answers, or a stream of deltas that cancels the request when dropped.

use crate::connection::Connection;
use crate::{Client, Error};
use futures_util::Stream;
use llmd_proto::chat::{ChatDelta, ChatParams, ChatRequest, ChatResponse, Delta};
use llmd_proto::methods::{names, CancelParams};
use llmd_proto::Id;
use serde_json::value::RawValue;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{mpsc, oneshot};

/// What a chat stream yields.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatEvent {
    /// A delta, in arrival order.
    Delta(Delta),
    /// The assembled answer; the stream ends after it.
    Done(ChatResponse),
}

/// A streaming chat call. Dropping it before [`ChatEvent::Done`] cancels the request in the
/// daemon, which stops the upstream request.
pub struct ChatStream {
    conn: Arc<Connection>,
    id: i64,
    deltas: mpsc::UnboundedReceiver<Box<RawValue>>,
    answer: Option<oneshot::Receiver<Result<Box<RawValue>, Error>>>,
    finished: bool,
}

impl Client {
    /// Sends a chat request and waits for the whole answer.
    pub async fn chat(&self, profile: &str, request: ChatRequest) -> Result<ChatResponse, Error> {
        self.call(
            names::CHAT,
            &ChatParams {
                profile: profile.into(),
                request,
                stream: false,
            },
        )
        .await
    }

    /// Sends a streaming chat request.
    pub async fn chat_stream(
        &self,
        profile: &str,
        request: ChatRequest,
    ) -> Result<ChatStream, Error> {
        let params = ChatParams {
            profile: profile.into(),
            request,
            stream: true,
        };
        let params =
            serde_json::value::to_raw_value(&params).map_err(|e| Error::Protocol(e.to_string()))?;
        let conn = self.connection().await?;
        let (tx, deltas) = mpsc::unbounded_channel();
        let (id, answer) = conn.start(names::CHAT, &params, Some(tx)).await?;
        Ok(ChatStream {
            conn,
            id,
            deltas,
            answer: Some(answer),
            finished: false,
        })
    }
}

impl ChatStream {
    /// The request id the daemon knows this stream by.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The next event, or `None` after [`ChatEvent::Done`].
    pub async fn next_event(&mut self) -> Option<Result<ChatEvent, Error>> {
        futures_util::StreamExt::next(self).await
    }
}

impl Stream for ChatStream {
    type Item = Result<ChatEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        // Deltas first: the daemon sends them all before the final answer.
        if let Poll::Ready(Some(raw)) = self.deltas.poll_recv(cx) {
            return Poll::Ready(Some(
                serde_json::from_str::<ChatDelta>(raw.get())
                    .map(|d| ChatEvent::Delta(d.delta))
                    .map_err(|e| Error::Protocol(format!("bad chat.delta: {e}"))),
            ));
        }
        let Some(answer) = self.answer.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(answer).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                // The reader routes lines in order, so every delta sent before the answer
                // was already returned by the poll_recv above.
                self.finished = true;
                self.answer = None;
                let item = result
                    .map_err(|_| Error::Disconnected)
                    .and_then(|r| r)
                    .and_then(|raw| {
                        serde_json::from_str::<ChatResponse>(raw.get())
                            .map(ChatEvent::Done)
                            .map_err(|e| Error::Protocol(format!("bad chat result: {e}")))
                    });
                Poll::Ready(Some(item))
            }
        }
    }
}

impl Drop for ChatStream {
    fn drop(&mut self) {
        self.conn.end_stream(self.id);
        if self.finished || !self.conn.is_alive() {
            return;
        }
        let conn = self.conn.clone();
        let id = self.id;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Ok(params) =
                    serde_json::value::to_raw_value(&CancelParams { id: Id::Num(id) })
                {
                    let _ = conn.call(names::CANCEL, &params).await;
                }
            });
        }
    }
}
