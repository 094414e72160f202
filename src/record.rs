//! What the stores read back, and the decisions taken on it: one copy for every backend.

use crate::cache::Completed;
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::response::{HeaderList, StoredResponse, decode_headers};

pub(crate) const STATE_IN_FLIGHT: i64 = 0;
pub(crate) const STATE_COMPLETED: i64 = 1;

/// What a claim found when it could not take the record.
#[derive(Debug)]
pub(crate) enum Decision {
    Replay(StoredResponse),
    InFlight { locked_until: i64 },
    Mismatch,
}

/// A record as a store returns it, before it is checked and decoded.
#[derive(Clone)]
pub(crate) struct RawRecord {
    pub(crate) fingerprint: Vec<u8>,
    pub(crate) state: i64,
    pub(crate) locked_until: i64,
    pub(crate) status: Option<i64>,
    pub(crate) headers: Option<Vec<u8>>,
    pub(crate) body: Option<Vec<u8>>,
    pub(crate) trailers: Option<Vec<u8>>,
}

impl RawRecord {
    /// The stored fingerprint; a length other than 32 bytes is a corrupt row.
    pub(crate) fn fingerprint(&self) -> Result<[u8; 32]> {
        self.fingerprint
            .as_slice()
            .try_into()
            .map_err(|_| Error::Corrupt {
                detail: format!("fingerprint of {} bytes", self.fingerprint.len()),
            })
    }

    /// What a claim with `fingerprint` gets from this live record.
    pub(crate) fn decide(self, fingerprint: &Fingerprint) -> Result<Decision> {
        if self.fingerprint()? != *fingerprint.as_bytes() {
            return Ok(Decision::Mismatch);
        }
        match self.state {
            STATE_IN_FLIGHT => Ok(Decision::InFlight {
                locked_until: self.locked_until,
            }),
            STATE_COMPLETED => Ok(Decision::Replay(self.into_response()?)),
            s => Err(Error::Corrupt {
                detail: format!("unknown record state {s}"),
            }),
        }
    }

    /// The stored response of a completed record.
    pub(crate) fn into_response(self) -> Result<StoredResponse> {
        let status = self
            .status
            .and_then(|s| u16::try_from(s).ok())
            .ok_or_else(|| Error::Corrupt {
                detail: format!("completed record with status {:?}", self.status),
            })?;
        let headers = match &self.headers {
            Some(h) => decode_headers(h)?,
            None => HeaderList::new(),
        };
        let trailers = self.trailers.as_deref().map(decode_headers).transpose()?;
        Ok(StoredResponse {
            status,
            headers,
            body: self.body.unwrap_or_default(),
            trailers,
        })
    }
}

/// What a read connection found for a claim.
pub(crate) enum Read {
    /// A live completed record with another fingerprint (its response is not decoded).
    Mismatch,
    /// A live completed record with the claim's fingerprint.
    Completed(Completed),
}
