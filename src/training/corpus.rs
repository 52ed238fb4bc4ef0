//! The token file of a training run and the seeded order its sequences are drawn in.
//!
//! A token file is JSON: either an array of token-id sequences (`[[464, 2068], [1169, 318, 7]]`,
//! lengths may differ) or one flat array of token ids (`[464, 2068, 1169]`). Either way it is cut
//! into non-overlapping windows of the run's sequence length `S`, each sequence on its own (a
//! window never spans two sequences; the tail shorter than `S` is dropped).
//!
//! Key design decision: the order is epochs of seeded permutations of the windows (ChaCha8, one
//! stream for the sampler), and a batch takes the next `B` windows, crossing into the next epoch
//! when one runs out. The same file, seed, `B` and `S` give the same batches, step for step, on
//! any machine.
//!
//! A corpus has a digest ([`Corpus::digest`]: FNV-1a, 64 bits, written out below, over each
//! sequence's length and ids) that a resumed run compares to tell the same data from other data,
//! however the JSON is laid out. A sampler can be put back where it was by replaying the batches
//! it drew ([`Sampler::skip`]).
//!
//! What it is not: a tokenizer or a streaming reader; the whole file is read into memory (its
//! size is checked by the caller).

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::model::GptConfig;
use crate::reference::{Batch, BatchError};

/// What is wrong with a token file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CorpusError {
    #[error("expected a JSON array of token ids or an array of arrays of token ids: {reason}")]
    Json { reason: String },
    #[error("{} is {value}, not a token id (an integer from 0 to {})", place(.sequence, .position), u32::MAX)]
    NotATokenId {
        /// The sequence of a nested file, `None` for a flat one.
        sequence: Option<usize>,
        position: usize,
        /// The element as JSON.
        value: String,
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
    #[error(
        "no sequence has {seq} tokens (the longest has {longest}): nothing to train on; lower --seq or add data"
    )]
    TooShort { seq: usize, longest: usize },
    #[error("sequence length {seq} is below 2: no position has a next token to predict")]
    SeqTooShort { seq: usize },
    #[error(transparent)]
    Batch(#[from] BatchError),
}

/// A token file cut into windows of `seq` tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corpus {
    seq: usize,
    /// Window `i` is `tokens[i * seq .. (i + 1) * seq]`.
    tokens: Vec<u32>,
    /// Every token id of the file in file order (for the prompt's initialisation).
    first: Vec<u32>,
    /// [`Corpus::digest`].
    digest: u64,
}

/// FNV-1a, 64 bits (offset basis 0xcbf29ce484222325, prime 0x100000001b3), over `bytes`,
/// continuing from `hash`.
pub(crate) fn fnv1a64(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// FNV-1a's 64-bit offset basis, the hash of no bytes.
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The digest of token sequences: FNV-1a 64 over, for each sequence in order, its length as a
/// little-endian `u64` and then its ids as little-endian `u32`s.
pub fn sequences_digest(rows: &[Vec<u32>]) -> u64 {
    rows.iter().fold(FNV_OFFSET, |hash, ids| {
        let hash = fnv1a64(hash, &(ids.len() as u64).to_le_bytes());
        ids.iter()
            .fold(hash, |hash, id| fnv1a64(hash, &id.to_le_bytes()))
    })
}

/// Where an element of a token file is.
fn place(sequence: &Option<usize>, position: &usize) -> String {
    match sequence {
        Some(s) => format!("sequence {s}, position {position}"),
        None => format!("position {position}"),
    }
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum TokenFile {
    Flat(Vec<u32>),
    Nested(Vec<Vec<u32>>),
}

/// The sequences of a token file: one flat array, or an array of arrays, of token ids. A file
/// that does not parse as either is read again as plain JSON to name its first bad element.
fn parse_token_file(text: &str) -> Result<Vec<Vec<u32>>, CorpusError> {
    match serde_json::from_str::<TokenFile>(text) {
        Ok(TokenFile::Flat(ids)) => Ok(vec![ids]),
        Ok(TokenFile::Nested(rows)) => Ok(rows),
        Err(_) => Err(first_bad_element(text)),
    }
}

/// Why `text` is not a token file: not JSON, not an array, or its first element that is not a
/// token id (a nested file is recognised by its first element being an array).
fn first_bad_element(text: &str) -> CorpusError {
    use serde_json::Value;
    let json = |reason: String| CorpusError::Json { reason };
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => return json(e.to_string()),
    };
    let Value::Array(items) = value else {
        return json(format!("the file holds {}", kind_of(&value)));
    };
    let is_id = |v: &Value| v.as_u64().is_some_and(|n| u32::try_from(n).is_ok());
    let bad = |sequence, position, v: &Value| CorpusError::NotATokenId {
        sequence,
        position,
        value: v.to_string(),
    };
    let nested = items.first().is_some_and(Value::is_array);
    for (i, item) in items.iter().enumerate() {
        match (nested, item.as_array()) {
            (true, Some(row)) => {
                if let Some((p, v)) = row.iter().enumerate().find(|(_, v)| !is_id(v)) {
                    return bad(Some(i), p, v);
                }
            }
            (true, None) => {
                return json(format!(
                    "element {i} is {item}, not an array of token ids as element 0 is"
                ));
            }
            (false, _) if !is_id(item) => return bad(None, i, item),
            (false, _) => {}
        }
    }
    json("it parses as JSON but not as token ids".into())
}

/// What a JSON value is, for an error.
fn kind_of(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

impl Corpus {
    /// Parses a token file and cuts it into windows of `seq` tokens, every id checked against
    /// the vocabulary of `config`.
    pub fn from_json(text: &str, seq: usize, config: &GptConfig) -> Result<Self, CorpusError> {
        if seq < 2 {
            return Err(CorpusError::SeqTooShort { seq });
        }
        let rows = parse_token_file(text)?;
        Self::from_sequences(&rows, seq, config)
    }

    /// Cuts `rows` into windows of `seq` tokens.
    pub fn from_sequences(
        rows: &[Vec<u32>],
        seq: usize,
        config: &GptConfig,
    ) -> Result<Self, CorpusError> {
        let vocab_size = config.vocab_size;
        for (row, ids) in rows.iter().enumerate() {
            if let Some((position, &id)) = ids
                .iter()
                .enumerate()
                .find(|(_, id)| **id as usize >= vocab_size)
            {
                return Err(CorpusError::TokenOutOfVocab {
                    id,
                    row,
                    position,
                    vocab_size,
                });
            }
        }
        let mut tokens = Vec::new();
        for ids in rows {
            for window in ids.chunks_exact(seq) {
                tokens.extend_from_slice(window);
            }
        }
        if tokens.is_empty() {
            let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
            return Err(CorpusError::TooShort { seq, longest });
        }
        Ok(Self {
            seq,
            tokens,
            first: rows.iter().flatten().copied().take(1 << 16).collect(),
            digest: sequences_digest(rows),
        })
    }

    /// Number of windows.
    pub fn windows(&self) -> usize {
        self.tokens.len() / self.seq
    }

    /// Tokens per window.
    pub fn seq(&self) -> usize {
        self.seq
    }

    /// Tokens in all windows.
    pub fn tokens(&self) -> usize {
        self.tokens.len()
    }

    /// The first `n` token ids of the file (fewer if it is shorter than that).
    pub fn first_ids(&self, n: usize) -> &[u32] {
        &self.first[..n.min(self.first.len())]
    }

    /// The digest of the file's sequences ([`sequences_digest`]): the same for the same ids in
    /// the same sequences, whatever the JSON's layout.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    fn window(&self, i: usize) -> &[u32] {
        &self.tokens[i * self.seq..(i + 1) * self.seq]
    }
}

/// Draws batches of windows in seeded epochs.
#[derive(Clone, Debug)]
pub struct Sampler {
    rng: ChaCha8Rng,
    order: Vec<usize>,
    cursor: usize,
    batch: usize,
    /// Batches drawn so far.
    drawn: u64,
}

impl Sampler {
    /// A sampler of `batch` windows at a time from `corpus`, in an order drawn from `seed`.
    pub fn new(corpus: &Corpus, batch: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(0x7261_696e); // "rain": apart from the streams of masks and weights
        let mut order: Vec<usize> = (0..corpus.windows()).collect();
        order.shuffle(&mut rng);
        Self {
            rng,
            order,
            cursor: 0,
            batch,
            drawn: 0,
        }
    }

    /// Batches drawn so far (by [`Sampler::next_batch`] and [`Sampler::skip`]).
    pub fn drawn(&self) -> u64 {
        self.drawn
    }

    /// Moves on by `batches` batches without building them: afterwards the sampler is where
    /// it would be after `batches` calls of [`Sampler::next_batch`] (a resumed run's sampler).
    pub fn skip(&mut self, batches: u64) {
        for _ in 0..batches {
            for _ in 0..self.batch {
                self.next_window();
            }
            self.drawn += 1;
        }
    }

    /// The index of the next window; a new permutation starts whenever the windows run out.
    fn next_window(&mut self) -> usize {
        if self.cursor == self.order.len() {
            self.order.shuffle(&mut self.rng);
            self.cursor = 0;
        }
        let window = self.order.get(self.cursor).copied().unwrap_or(0);
        self.cursor += 1;
        window
    }

    /// The next batch; a new permutation starts whenever the windows run out.
    pub fn next_batch(
        &mut self,
        corpus: &Corpus,
        config: &GptConfig,
    ) -> Result<Batch, CorpusError> {
        let mut tokens = Vec::with_capacity(self.batch * corpus.seq);
        for _ in 0..self.batch {
            let window = self.next_window();
            tokens.extend_from_slice(corpus.window(window));
        }
        self.drawn += 1;
        Ok(Batch::new(config, self.batch, corpus.seq, tokens)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> GptConfig {
        GptConfig::preset("tiny").unwrap()
    }

    #[test]
    fn nested_sequences_are_cut_on_their_own_and_tails_dropped() {
        // [0..5) -> one window of 4 (tail 4 dropped); [10..13) -> too short; [20..28) -> two.
        let text = "[[0,1,2,3,4],[10,11,12],[20,21,22,23,24,25,26,27]]";
        let c = Corpus::from_json(text, 4, &tiny()).unwrap();
        assert_eq!(c.windows(), 3);
        assert_eq!(c.window(0), &[0, 1, 2, 3]);
        assert_eq!(c.window(1), &[20, 21, 22, 23]);
        assert_eq!(c.window(2), &[24, 25, 26, 27]);
        assert_eq!(c.first_ids(3), &[0, 1, 2]);
    }

    #[test]
    fn a_flat_array_is_one_sequence() {
        let c = Corpus::from_json("[1,2,3,4,5,6,7]", 3, &tiny()).unwrap();
        assert_eq!(c.windows(), 2);
        assert_eq!(c.tokens(), 6);
    }

    #[test]
    fn bad_files_name_what_is_wrong() {
        let err = Corpus::from_json("[[1,2],[3,300]]", 2, &tiny()).unwrap_err();
        assert_eq!(
            err,
            CorpusError::TokenOutOfVocab {
                id: 300,
                row: 1,
                position: 1,
                vocab_size: 256
            }
        );
        let err = Corpus::from_json("[1,2,3]", 4, &tiny()).unwrap_err();
        assert_eq!(err, CorpusError::TooShort { seq: 4, longest: 3 });
        let error = |text| Corpus::from_json(text, 2, &tiny()).unwrap_err().to_string();
        let prefix = "expected a JSON array of token ids or an array of arrays of token ids: ";
        assert_eq!(
            error("{\"a\": 1}"),
            format!("{prefix}the file holds an object")
        );
        assert_eq!(
            error("[1,2,-3]"),
            "position 2 is -3, not a token id (an integer from 0 to 4294967295)"
        );
        assert_eq!(
            error("[[1,2],[1.5,2]]"),
            "sequence 1, position 0 is 1.5, not a token id (an integer from 0 to 4294967295)"
        );
        assert_eq!(
            error("[1,4294967296]"),
            "position 1 is 4294967296, not a token id (an integer from 0 to 4294967295)"
        );
        assert_eq!(
            error("[[1,2],3]"),
            format!("{prefix}element 1 is 3, not an array of token ids as element 0 is")
        );
    }

    #[test]
    fn every_window_is_drawn_once_per_epoch_in_a_seeded_order() {
        let config = tiny();
        let ids: Vec<u32> = (0..20).collect();
        let c = Corpus::from_sequences(&[ids], 2, &config).unwrap();
        let mut s = Sampler::new(&c, 5, 7);
        // 10 windows, 5 per batch: two batches are one epoch, each window exactly once.
        let mut firsts: Vec<u32> = (0..2)
            .flat_map(|_| s.next_batch(&c, &config).unwrap().tokens)
            .step_by(2)
            .collect();
        firsts.sort_unstable();
        assert_eq!(firsts, (0..20).step_by(2).collect::<Vec<u32>>());
        let again = Sampler::new(&c, 5, 7).next_batch(&c, &config).unwrap();
        let other = Sampler::new(&c, 5, 8).next_batch(&c, &config).unwrap();
        assert_eq!(
            again,
            Sampler::new(&c, 5, 7).next_batch(&c, &config).unwrap()
        );
        assert_ne!(again, other);
    }

    #[test]
    fn a_skipped_sampler_draws_what_a_drawing_one_draws_next() {
        let config = tiny();
        let ids: Vec<u32> = (0..14).collect();
        let c = Corpus::from_sequences(&[ids], 2, &config).unwrap();
        // 7 windows, 3 per batch: 5 batches cross two epoch boundaries (after 7 and 14 windows).
        let mut drawing = Sampler::new(&c, 3, 11);
        for _ in 0..5 {
            drawing.next_batch(&c, &config).unwrap();
        }
        let mut skipped = Sampler::new(&c, 3, 11);
        skipped.skip(5);
        assert_eq!((drawing.drawn(), skipped.drawn()), (5, 5));
        for _ in 0..4 {
            assert_eq!(
                drawing.next_batch(&c, &config).unwrap(),
                skipped.next_batch(&c, &config).unwrap()
            );
        }
    }

    #[test]
    fn the_digest_is_fnv1a_of_lengths_and_ids_whatever_the_layout() {
        // FNV-1a 64 of the empty input is the offset basis; of the single byte 0x61 ("a") it is
        // 0xaf63dc4c8601ec8c (the published test vector).
        assert_eq!(fnv1a64(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        // One sequence [1, 2]: the bytes 02 00.. (u64 2), 01 00 00 00, 02 00 00 00.
        let mut bytes = 2u64.to_le_bytes().to_vec();
        bytes.extend([1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(sequences_digest(&[vec![1, 2]]), fnv1a64(FNV_OFFSET, &bytes));
        let flat = Corpus::from_json("[1, 2, 3, 4]", 2, &tiny()).unwrap();
        let nested = Corpus::from_json("[[1,2,3,4]]", 2, &tiny()).unwrap();
        let split = Corpus::from_json("[[1,2],[3,4]]", 2, &tiny()).unwrap();
        let other = Corpus::from_json("[1, 2, 3, 5]", 2, &tiny()).unwrap();
        assert_eq!(flat.digest(), nested.digest());
        // The same windows at S = 2, but not at S = 3: other sequences are another file.
        assert_ne!(flat.digest(), split.digest());
        assert_ne!(flat.digest(), other.digest());
    }
}
