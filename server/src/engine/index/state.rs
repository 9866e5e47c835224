//! The state record: the index's mutable facts and the manifest every other record of the
//! index is checked against (docs/FORMAT.md "State record").

use super::*;

/// The persisted, mutable facts about an index (the sealed state record), including the
/// manifest that every other record of the index is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct State {
    pub dimension: u32,
    pub gen: u32,
    pub trained: bool,
    pub n_lists: u32,
    /// Default `n_probes` calibrated at training (0 = not calibrated).
    pub default_probes: u32,
    /// Bumped by every write batch of the index.
    pub epoch: u64,
    /// [`super::super::meta::meta_digest`] of the index's meta record.
    pub meta_digest: [u8; 32],
    /// `(list, block, epoch, rows)` of every block of generation `gen`, sorted.
    pub manifest: Vec<(u32, u32, u64, u32)>,
}

impl State {
    /// Plaintext of the sealed state record; see docs/FORMAT.md "State record".
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64 + self.manifest.len() * 20);
        w.u8(4)
            .u32(self.dimension)
            .u32(self.gen)
            .u8(self.trained as u8)
            .u32(self.n_lists)
            .u32(self.default_probes)
            .u64(self.epoch)
            .raw(&self.meta_digest)
            .u32(self.manifest.len() as u32);
        for &(l, b, e, n) in &self.manifest {
            w.u32(l).u32(b).u64(e).u32(n);
        }
        w.0
    }

    pub(super) fn decode(buf: &[u8]) -> Result<Self, EngineError> {
        let mut r = Reader::new(buf, "state record");
        // Version 3 (before position records) has no row counts: they read as 0, and
        // `Index::load_data` upgrades such an index in place.
        let version = r.u8()?;
        if version != 3 && version != 4 {
            return Err(EngineError::Corrupt("unknown state record version".into()));
        }
        let entry = if version == 4 { 20 } else { 16 };
        let mut st = Self {
            dimension: r.u32()?,
            gen: r.u32()?,
            trained: r.u8()? != 0,
            n_lists: r.u32()?,
            default_probes: r.u32()?,
            epoch: r.u64()?,
            meta_digest: r
                .take(32)?
                .try_into()
                .map_err(|_| EngineError::Corrupt("state record is truncated".into()))?,
            manifest: Vec::new(),
        };
        let n = r.u32()? as usize;
        if n > r.remaining() / entry {
            return Err(EngineError::Corrupt(
                "state record manifest is truncated".into(),
            ));
        }
        st.manifest.reserve_exact(n);
        for _ in 0..n {
            let (l, b, e) = (r.u32()?, r.u32()?, r.u64()?);
            let rows = if version == 4 { r.u32()? } else { 0 };
            st.manifest.push((l, b, e, rows));
        }
        Ok(st)
    }

    #[cfg(test)]
    pub(crate) fn decode_for_test(buf: &[u8]) -> Result<Self, EngineError> {
        Self::decode(buf)
    }

    pub(crate) fn fresh(dimension: u32, meta_digest: [u8; 32]) -> Self {
        Self {
            dimension,
            gen: 0,
            trained: false,
            n_lists: 1,
            default_probes: 0,
            epoch: 0,
            meta_digest,
            manifest: Vec::new(),
        }
    }

    /// The state of `d` after a batch at `epoch` that rewrote `touched` (empty = deleted).
    pub(super) fn after(
        d: &Data,
        dimension: u32,
        epoch: u64,
        touched: &HashMap<(u32, u32), Block>,
        meta_digest: [u8; 32],
    ) -> Self {
        let mut manifest: Vec<(u32, u32, u64, u32)> = d
            .lists
            .iter()
            .enumerate()
            .flat_map(|(l, pl)| {
                pl.blocks
                    .iter()
                    .map(move |(&b, m)| (l as u32, b, m.epoch, m.rows))
            })
            .filter(|(l, b, _, _)| !touched.contains_key(&(*l, *b)))
            .collect();
        manifest.extend(
            touched
                .iter()
                .filter(|(_, blk)| blk.len() > 0)
                .map(|(&(l, b), blk)| (l, b, epoch, blk.len() as u32)),
        );
        manifest.sort_unstable();
        Self {
            dimension,
            gen: d.gen,
            trained: d.trained,
            n_lists: d.n_lists() as u32,
            default_probes: d.default_probes,
            epoch,
            meta_digest,
            manifest,
        }
    }
}
