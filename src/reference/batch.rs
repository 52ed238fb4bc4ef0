//! A batch of token sequences, and the checks that make it safe to index with.

use crate::model::GptConfig;

/// What is wrong with a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    #[error("batch size is 0: at least one sequence is needed")]
    EmptyBatch,
    #[error("sequence length {seq} is below 2: no position has a next token to predict")]
    SeqTooShort { seq: usize },
    #[error("sequence length {seq} exceeds the model's n_positions {n_positions}")]
    SeqTooLong { seq: usize, n_positions: usize },
    #[error("batch {batch} x seq {seq} needs {expected} tokens, got {got}")]
    TokenCount {
        batch: usize,
        seq: usize,
        expected: usize,
        got: usize,
    },
    #[error(
        "token id {id} (sequence {row}, position {position}) is outside the vocabulary of {vocab_size}"
    )]
    TokenOutOfVocab {
        id: u32,
        row: usize,
        position: usize,
        vocab_size: usize,
    },
    #[error("expected a JSON array of arrays of token ids: {reason}")]
    Json { reason: String },
    #[error("sequence {row} has {len} tokens, sequence 0 has {first}")]
    Ragged {
        row: usize,
        len: usize,
        first: usize,
    },
}

/// `batch` sequences of `seq` token ids, row-major (`tokens[b * seq + s]`). Every position but
/// the last of a sequence predicts the next token, so the loss averages `batch * (seq - 1)` terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub tokens: Vec<u32>,
}

impl Batch {
    /// A batch checked against `config` (see [`Batch::validate`]).
    pub fn new(
        config: &GptConfig,
        batch: usize,
        seq: usize,
        tokens: Vec<u32>,
    ) -> Result<Self, BatchError> {
        let out = Self { batch, seq, tokens };
        out.validate(config)?;
        Ok(out)
    }

    /// A batch from the text of a token file: a JSON array of equally long arrays of token ids
    /// (`[[464, 2068], [1169, 318]]`), checked against `config` like [`Batch::new`].
    pub fn from_json(config: &GptConfig, text: &str) -> Result<Self, BatchError> {
        let rows: Vec<Vec<u32>> = serde_json::from_str(text).map_err(|e| BatchError::Json {
            reason: e.to_string(),
        })?;
        let first = rows.first().map_or(0, Vec::len);
        if let Some((row, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != first) {
            return Err(BatchError::Ragged {
                row,
                len: r.len(),
                first,
            });
        }
        Self::new(config, rows.len(), first, rows.concat())
    }

    /// Checks `batch >= 1`, `2 <= seq <= n_positions`, `batch * seq` tokens, every id below
    /// `vocab_size`.
    pub fn validate(&self, config: &GptConfig) -> Result<(), BatchError> {
        let (batch, seq) = (self.batch, self.seq);
        if batch == 0 {
            return Err(BatchError::EmptyBatch);
        }
        if seq < 2 {
            return Err(BatchError::SeqTooShort { seq });
        }
        if seq > config.n_positions {
            return Err(BatchError::SeqTooLong {
                seq,
                n_positions: config.n_positions,
            });
        }
        let expected = batch.saturating_mul(seq);
        if self.tokens.len() != expected {
            return Err(BatchError::TokenCount {
                batch,
                seq,
                expected,
                got: self.tokens.len(),
            });
        }
        let vocab_size = config.vocab_size;
        match self.tokens.iter().position(|&id| id as usize >= vocab_size) {
            None => Ok(()),
            Some(t) => Err(BatchError::TokenOutOfVocab {
                id: self.tokens[t],
                row: t / seq,
                position: t % seq,
                vocab_size,
            }),
        }
    }

    /// Token positions in the batch, `batch * seq`.
    pub fn positions(&self) -> usize {
        self.batch * self.seq
    }

    /// Positions that predict a next token, `batch * (seq - 1)`: the loss's denominator.
    pub fn predicted_positions(&self) -> usize {
        self.batch * self.seq.saturating_sub(1)
    }
}
