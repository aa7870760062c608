//! Little-endian reading for the learning protocol's binary formats (peer messages and
//! update payloads): a cursor that refuses to read past its end, and f32 arrays.

/// A cursor over bytes; every read that would pass the end fails with `truncated`.
pub(crate) struct Cursor<'a, E> {
    bytes: &'a [u8],
    truncated: E,
}

impl<'a, E: Clone> Cursor<'a, E> {
    /// A cursor at the start of `bytes`.
    pub(crate) fn new(bytes: &'a [u8], truncated: E) -> Self {
        Self { bytes, truncated }
    }

    /// The next `n` bytes.
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], E> {
        if n > self.bytes.len() {
            return Err(self.truncated.clone());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// The next `N` bytes as an array.
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], E> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// The next `u32`.
    pub(crate) fn u32(&mut self) -> Result<u32, E> {
        self.array().map(u32::from_le_bytes)
    }

    /// The next `u64`.
    pub(crate) fn u64(&mut self) -> Result<u64, E> {
        self.array().map(u64::from_le_bytes)
    }

    /// The next `count` f32 values.
    pub(crate) fn f32s(&mut self, count: usize) -> Result<Vec<f32>, E> {
        let raw = self.take(count.checked_mul(4).ok_or_else(|| self.truncated.clone())?)?;
        Ok(raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// Everything left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    /// Whether everything has been read.
    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}
