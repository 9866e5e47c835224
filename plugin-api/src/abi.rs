//! The stable C ABI between the SealDB server and dynamically loaded plugins (ABI 1.0).
//!
//! `docs/plugins.md` specifies every byte; this module is that specification in Rust, shared
//! by the server's loader and by [`declare_plugin!`](crate::declare_plugin), which generates a
//! plugin's exports from plain safe Rust. Plugin authors never touch these types.
//!
//! In short:
//! * A plugin library exports one symbol, [`ENTRY_SYMBOL`], an `extern "C" fn() -> *const
//!   Descriptor` returning a `'static` [`Descriptor`]: magic, ABI version, its own size, name,
//!   version, `init`, `free_buf`, and optional function tables ([`KmsTable`], [`StoreTable`]).
//!   Every table starts with its own size and only ever grows by appending fields.
//! * Inputs are borrowed [`Bytes`] valid for the call. Outputs are [`Buf`]s allocated by the
//!   plugin and released by the host through the plugin's `free_buf`; the host wipes buffers
//!   that held key material before releasing them.
//! * Every call returns a [`status`] code and fills its `out` buffer with the result (on `OK`)
//!   or a UTF-8 message (otherwise).

#![allow(unsafe_code)]

use std::ffi::c_void;

/// `"SEALDBPL"` as a little-endian u64: the first field of every descriptor.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SEALDBPL");
/// Major version: a plugin of another major version is refused.
pub const ABI_MAJOR: u16 = 1;
/// Minor version: grows when fields are appended; older minors keep loading.
pub const ABI_MINOR: u16 = 0;
/// The one symbol a plugin exports.
pub const ENTRY_SYMBOL: &str = "sealdb_plugin_entry_v1";

/// Status codes returned by every call.
pub mod status {
    pub const OK: u32 = 0;
    pub const NOT_FOUND: u32 = 1;
    pub const INVALID: u32 = 2;
    pub const DENIED: u32 = 3;
    pub const UNAVAILABLE: u32 = 4;
    pub const INTERNAL: u32 = 5;
    /// KMS only: the wrapped key does not open (wrong key, context or version).
    pub const CANNOT_UNWRAP: u32 = 6;
}

/// Log levels of [`HostApi::log`].
pub mod level {
    pub const ERROR: u32 = 1;
    pub const WARN: u32 = 2;
    pub const INFO: u32 = 3;
    pub const DEBUG: u32 = 4;
}

/// A borrowed byte slice, valid for the duration of the call it is passed to.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Bytes {
    pub ptr: *const u8,
    pub len: usize,
}

impl Bytes {
    /// Borrow a slice (or a `'static` string for descriptor fields).
    pub const fn of(s: &[u8]) -> Self {
        Self {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// View the bytes.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes that stay valid and unchanged for `'a`
    /// (or `len` must be 0).
    pub unsafe fn as_slice<'a>(&self) -> &'a [u8] {
        if self.len == 0 || self.ptr.is_null() {
            &[]
        } else {
            // SAFETY: guaranteed by the caller (the ABI: borrowed inputs are valid for the call,
            // descriptor strings are 'static).
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

/// An owned buffer allocated by the plugin (a `Vec<u8>`'s parts). The receiver releases it
/// with the plugin's [`Descriptor::free_buf`], exactly once.
#[repr(C)]
#[derive(Debug)]
pub struct Buf {
    pub ptr: *mut u8,
    pub len: usize,
    pub cap: usize,
}

impl Buf {
    /// The empty buffer (nothing to free).
    pub const EMPTY: Buf = Buf {
        ptr: std::ptr::null_mut(),
        len: 0,
        cap: 0,
    };

    /// Give up a vector's allocation to the other side.
    pub fn from_vec(v: Vec<u8>) -> Self {
        let mut v = std::mem::ManuallyDrop::new(v);
        Self {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            cap: v.capacity(),
        }
    }

    /// Take the allocation back (plugin side, in `free_buf`).
    ///
    /// # Safety
    /// The parts must come from [`Buf::from_vec`] in this same library, not yet reclaimed.
    pub unsafe fn into_vec(self) -> Vec<u8> {
        if self.ptr.is_null() {
            return Vec::new();
        }
        // SAFETY: the parts came from a Vec<u8> of this library's allocator (caller's contract).
        unsafe { Vec::from_raw_parts(self.ptr, self.len, self.cap) }
    }
}

/// Callbacks the host offers a plugin (passed to [`Descriptor::init`]).
#[repr(C)]
pub struct HostApi {
    /// `size_of::<HostApi>()` on the host: fields past it do not exist.
    pub size: u32,
    /// Opaque to the plugin: passed back with every callback (the host knows which plugin
    /// speaks by it).
    pub context: *const c_void,
    /// Log a UTF-8 message at a [`level`] through the server's `tracing`.
    pub log: extern "C" fn(context: *const c_void, level: u32, message: Bytes),
}

// SAFETY: the host's table is immutable and lives for the process; `context` is only ever
// handed back to the host.
unsafe impl Sync for HostApi {}
// SAFETY: as above.
unsafe impl Send for HostApi {}

/// The static descriptor a plugin's entry symbol returns.
#[repr(C)]
pub struct Descriptor {
    /// [`MAGIC`].
    pub magic: u64,
    pub abi_major: u16,
    pub abi_minor: u16,
    /// `size_of::<Descriptor>()` in the plugin: the host reads no field past it.
    pub size: u32,
    /// The plugin's name (UTF-8), for logs and errors.
    pub name: Bytes,
    /// The plugin's version (UTF-8).
    pub version: Bytes,
    /// Called once after loading, before any other call. `out` gets a message on failure.
    pub init: extern "C" fn(host: *const HostApi, out: *mut Buf) -> u32,
    /// Release a [`Buf`] this plugin allocated.
    pub free_buf: extern "C" fn(buf: Buf),
    /// The KMS provider this plugin offers, or null.
    pub kms: *const KmsTable,
    /// The index store this plugin offers, or null.
    pub store: *const StoreTable,
}

/// Functions of a KMS provider. `handle` is what `create` returned.
#[repr(C)]
pub struct KmsTable {
    /// `size_of::<KmsTable>()` in the plugin.
    pub size: u32,
    /// The provider name `kms.registry` slots use (UTF-8).
    pub provider: Bytes,
    /// Make an instance for one slot. `config` is the slot's fields as a JSON object of
    /// strings. On `OK`, `*handle` is set and `out` holds `key_id || 0x00 || region` (UTF-8).
    pub create: extern "C" fn(config: Bytes, handle: *mut *mut c_void, out: *mut Buf) -> u32,
    /// Release an instance.
    pub destroy: extern "C" fn(handle: *mut c_void),
    /// Wrap a KEK. On `OK`, `out` = `u32 LE ciphertext length || ciphertext || key version`.
    pub wrap:
        extern "C" fn(handle: *const c_void, kek: Bytes, context: Bytes, out: *mut Buf) -> u32,
    /// Unwrap. On `OK`, `out` = the KEK (the host wipes it before releasing it).
    pub unwrap:
        extern "C" fn(handle: *const c_void, wrapped: Bytes, context: Bytes, out: *mut Buf) -> u32,
    /// Liveness probe.
    pub health: extern "C" fn(handle: *const c_void, out: *mut Buf) -> u32,
}

/// Functions of an index store. Encodings of lists and batches: [`codec`].
#[repr(C)]
pub struct StoreTable {
    /// `size_of::<StoreTable>()` in the plugin.
    pub size: u32,
    /// The name `--db-type` selects (UTF-8).
    pub name: Bytes,
    /// Open the store. `config` is a JSON object. On `OK`, `*handle` is set.
    pub open: extern "C" fn(config: Bytes, handle: *mut *mut c_void, out: *mut Buf) -> u32,
    /// Close it.
    pub close: extern "C" fn(handle: *mut c_void),
    /// One key: `OK` with the value, or `NOT_FOUND`.
    pub get: extern "C" fn(handle: *const c_void, key: Bytes, out: *mut Buf) -> u32,
    /// Several keys ([`codec::encode_list`]): `OK` with [`codec::encode_options`].
    pub get_many: extern "C" fn(handle: *const c_void, keys: Bytes, out: *mut Buf) -> u32,
    /// Keys starting with `prefix`, ascending: `OK` with [`codec::encode_pairs`]
    /// (`keys_only` = 1: [`codec::encode_list`] of keys).
    pub scan:
        extern "C" fn(handle: *const c_void, prefix: Bytes, keys_only: u8, out: *mut Buf) -> u32,
    /// Apply a batch ([`codec::encode_batch`]) atomically and durably.
    pub write: extern "C" fn(handle: *const c_void, batch: Bytes, out: *mut Buf) -> u32,
}

// SAFETY: a descriptor and its tables are immutable 'static data (string literals and function
// pointers); sharing them between threads cannot race.
unsafe impl Sync for Descriptor {}
// SAFETY: as above.
unsafe impl Sync for KmsTable {}
// SAFETY: as above.
unsafe impl Sync for StoreTable {}
// SAFETY: `Bytes` is only ever a view of immutable data.
unsafe impl Sync for Bytes {}
// SAFETY: as above; the data it views is valid wherever the view is used (ABI contract).
unsafe impl Send for Bytes {}

/// Byte encodings of lists, optional values, pairs and batches (all lengths u32 LE).
pub mod codec {
    use crate::store::{KeyValue, WriteBatch, WriteOp};

    fn put(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }

    /// A bounds-checked reader; every malformed input is an error, never a panic.
    pub struct Reader<'a>(pub &'a [u8]);

    impl<'a> Reader<'a> {
        pub fn u8(&mut self) -> Result<u8, String> {
            let (&b, rest) = self.0.split_first().ok_or("truncated")?;
            self.0 = rest;
            Ok(b)
        }
        pub fn u32(&mut self) -> Result<u32, String> {
            if self.0.len() < 4 {
                return Err("truncated".into());
            }
            let (a, rest) = self.0.split_at(4);
            self.0 = rest;
            Ok(u32::from_le_bytes([a[0], a[1], a[2], a[3]]))
        }
        pub fn bytes(&mut self) -> Result<&'a [u8], String> {
            let n = self.u32()? as usize;
            if self.0.len() < n {
                return Err("truncated".into());
            }
            let (a, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(a)
        }
        fn count(&mut self, min_item: usize) -> Result<usize, String> {
            let n = self.u32()? as usize;
            // Refuse counts the remaining bytes cannot hold (no huge allocations).
            if n.saturating_mul(min_item) > self.0.len() {
                return Err("count larger than the data".into());
            }
            Ok(n)
        }
        pub fn done(&self) -> Result<(), String> {
            if self.0.is_empty() {
                Ok(())
            } else {
                Err("trailing bytes".into())
            }
        }
    }

    /// `u32 count || (bytes)*`.
    pub fn encode_list<T: AsRef<[u8]>>(items: &[T]) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(4 + items.iter().map(|i| 4 + i.as_ref().len()).sum::<usize>());
        out.extend_from_slice(&(items.len() as u32).to_le_bytes());
        for i in items {
            put(&mut out, i.as_ref());
        }
        out
    }

    pub fn decode_list(buf: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let mut r = Reader(buf);
        let n = r.count(4)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(r.bytes()?.to_vec());
        }
        r.done()?;
        Ok(out)
    }

    /// `u32 count || (u8 present || [bytes])*`.
    pub fn encode_options(items: &[Option<Vec<u8>>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(items.len() as u32).to_le_bytes());
        for i in items {
            match i {
                None => out.push(0),
                Some(v) => {
                    out.push(1);
                    put(&mut out, v);
                }
            }
        }
        out
    }

    pub fn decode_options(buf: &[u8]) -> Result<Vec<Option<Vec<u8>>>, String> {
        let mut r = Reader(buf);
        let n = r.count(1)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(match r.u8()? {
                0 => None,
                1 => Some(r.bytes()?.to_vec()),
                _ => return Err("bad presence byte".into()),
            });
        }
        r.done()?;
        Ok(out)
    }

    /// `u32 count || (bytes key || bytes value)*`.
    pub fn encode_pairs(items: &[KeyValue]) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            4 + items
                .iter()
                .map(|(k, v)| 8 + k.len() + v.len())
                .sum::<usize>(),
        );
        out.extend_from_slice(&(items.len() as u32).to_le_bytes());
        for (k, v) in items {
            put(&mut out, k);
            put(&mut out, v);
        }
        out
    }

    pub fn decode_pairs(buf: &[u8]) -> Result<Vec<KeyValue>, String> {
        let mut r = Reader(buf);
        let n = r.count(8)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let k = r.bytes()?.to_vec();
            out.push((k, r.bytes()?.to_vec()));
        }
        r.done()?;
        Ok(out)
    }

    /// `u32 count || (u8 op || bytes key || [bytes value])*`; op 0 = put (with value),
    /// 1 = delete, 2 = delete prefix.
    pub fn encode_batch(batch: &WriteBatch) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(batch.len() as u32).to_le_bytes());
        for op in batch.ops() {
            match op {
                WriteOp::Put { key, value } => {
                    out.push(0);
                    put(&mut out, key);
                    put(&mut out, value);
                }
                WriteOp::Delete { key } => {
                    out.push(1);
                    put(&mut out, key);
                }
                WriteOp::DeletePrefix { prefix } => {
                    out.push(2);
                    put(&mut out, prefix);
                }
            }
        }
        out
    }

    pub fn decode_batch(buf: &[u8]) -> Result<WriteBatch, String> {
        let mut r = Reader(buf);
        let n = r.count(5)?;
        let mut b = WriteBatch::new();
        for _ in 0..n {
            match r.u8()? {
                0 => {
                    let k = r.bytes()?.to_vec();
                    b.put(k, r.bytes()?.to_vec());
                }
                1 => {
                    b.delete(r.bytes()?.to_vec());
                }
                2 => {
                    b.delete_prefix(r.bytes()?.to_vec());
                }
                _ => return Err("unknown batch op".into()),
            }
        }
        r.done()?;
        Ok(b)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn encodings_round_trip_and_refuse_garbage() {
            let l = vec![b"a".to_vec(), vec![], vec![0xff; 300]];
            assert_eq!(decode_list(&encode_list(&l)).unwrap(), l);
            let o = vec![None, Some(vec![]), Some(b"xy".to_vec())];
            assert_eq!(decode_options(&encode_options(&o)).unwrap(), o);
            let p = vec![(b"k".to_vec(), b"v".to_vec()), (vec![0], vec![])];
            assert_eq!(decode_pairs(&encode_pairs(&p)).unwrap(), p);
            let mut b = WriteBatch::new();
            b.delete_prefix("p").put("k", "v").delete("d");
            let enc = encode_batch(&b);
            assert_eq!(decode_batch(&enc).unwrap(), b);
            for cut in 0..enc.len() {
                assert!(decode_batch(&enc[..cut]).is_err());
            }
            assert!(
                decode_list(&[0xff, 0xff, 0xff, 0xff]).is_err(),
                "huge count"
            );
            let mut extra = enc.clone();
            extra.push(0);
            assert!(decode_batch(&extra).is_err());
        }
    }
}

/// Flat JSON objects (`{"name": "value", ...}`), the form slot fields and simple store configs
/// take across the ABI. Strings, numbers, booleans and null (dropped) are accepted; nested values
/// are refused. Small on purpose, so the API crate needs no JSON library.
pub mod flat_json {
    use std::collections::BTreeMap;

    fn escape(s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
    }

    /// Encode a map of strings.
    pub fn encode(fields: &BTreeMap<String, String>) -> String {
        let mut out = String::from("{");
        for (i, (k, v)) in fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            escape(k, &mut out);
            out.push(':');
            escape(v, &mut out);
        }
        out.push('}');
        out
    }

    struct P<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl P<'_> {
        fn ws(&mut self) {
            while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
        }
        fn eat(&mut self, c: u8) -> Result<(), String> {
            self.ws();
            if self.s.get(self.i) == Some(&c) {
                self.i += 1;
                Ok(())
            } else {
                Err(format!("expected '{}' at byte {}", c as char, self.i))
            }
        }
        fn string(&mut self) -> Result<String, String> {
            self.eat(b'"')?;
            let mut out = Vec::new();
            loop {
                let c = *self.s.get(self.i).ok_or("unterminated string")?;
                self.i += 1;
                match c {
                    b'"' => break,
                    b'\\' => {
                        let e = *self.s.get(self.i).ok_or("unterminated escape")?;
                        self.i += 1;
                        match e {
                            b'"' | b'\\' | b'/' => out.push(e),
                            b'n' => out.push(b'\n'),
                            b'r' => out.push(b'\r'),
                            b't' => out.push(b'\t'),
                            b'b' => out.push(8),
                            b'f' => out.push(12),
                            b'u' => {
                                let hex = self.s.get(self.i..self.i + 4).ok_or("bad \\u escape")?;
                                self.i += 4;
                                let code = u32::from_str_radix(
                                    std::str::from_utf8(hex).map_err(|_| "bad \\u escape")?,
                                    16,
                                )
                                .map_err(|_| "bad \\u escape")?;
                                let ch = char::from_u32(code).ok_or("unsupported \\u escape")?;
                                let mut b = [0; 4];
                                out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                            }
                            _ => return Err("bad escape".into()),
                        }
                    }
                    c => out.push(c),
                }
            }
            String::from_utf8(out).map_err(|_| "invalid UTF-8".into())
        }
        fn scalar(&mut self) -> Result<Option<String>, String> {
            self.ws();
            match self.s.get(self.i) {
                Some(b'"') => self.string().map(Some),
                Some(b'{') | Some(b'[') => Err("nested values are not supported".into()),
                Some(_) => {
                    let start = self.i;
                    while self.i < self.s.len()
                        && !matches!(self.s[self.i], b',' | b'}')
                        && !self.s[self.i].is_ascii_whitespace()
                    {
                        self.i += 1;
                    }
                    let word =
                        std::str::from_utf8(&self.s[start..self.i]).map_err(|_| "invalid UTF-8")?;
                    match word {
                        "null" => Ok(None),
                        "true" | "false" => Ok(Some(word.into())),
                        w if !w.is_empty() && w.parse::<f64>().is_ok() => Ok(Some(w.into())),
                        w => Err(format!("unexpected '{w}'")),
                    }
                }
                None => Err("unexpected end".into()),
            }
        }
    }

    /// Decode a flat object.
    pub fn decode(text: &str) -> Result<BTreeMap<String, String>, String> {
        let mut p = P {
            s: text.as_bytes(),
            i: 0,
        };
        let mut out = BTreeMap::new();
        p.eat(b'{')?;
        p.ws();
        if p.s.get(p.i) == Some(&b'}') {
            p.i += 1;
        } else {
            loop {
                let k = p.string()?;
                p.eat(b':')?;
                if let Some(v) = p.scalar()? {
                    out.insert(k, v);
                }
                p.ws();
                match p.s.get(p.i) {
                    Some(b',') => p.i += 1,
                    Some(b'}') => {
                        p.i += 1;
                        break;
                    }
                    _ => return Err(format!("expected ',' or '}}' at byte {}", p.i)),
                }
            }
        }
        p.ws();
        if p.i != p.s.len() {
            return Err("trailing characters".into());
        }
        Ok(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trip_and_scalars() {
            let mut m = BTreeMap::new();
            m.insert(
                "key_file".to_string(),
                "/tmp/a \"b\"\n\\c\u{1}é".to_string(),
            );
            m.insert("n".to_string(), "".to_string());
            assert_eq!(decode(&encode(&m)).unwrap(), m);
            let d = decode(r#" { "a" : 1.5 , "b": true, "c": null, "d": "\u00e9" } "#).unwrap();
            assert_eq!(d["a"], "1.5");
            assert_eq!(d["b"], "true");
            assert!(!d.contains_key("c"));
            assert_eq!(d["d"], "é");
            assert_eq!(decode("{}").unwrap().len(), 0);
            for bad in [
                "",
                "{",
                r#"{"a":{}}"#,
                r#"{"a":[1]}"#,
                r#"{"a":x}"#,
                r#"{"a":1} x"#,
                r#"{"a""#,
            ] {
                assert!(decode(bad).is_err(), "{bad}");
            }
        }
    }
}

#[cfg(all(test, target_pointer_width = "64"))]
mod layout_tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// The offsets docs/plugins.md gives for 64-bit targets.
    #[test]
    fn layout_matches_the_specification() {
        assert_eq!((size_of::<Bytes>(), size_of::<Buf>()), (16, 24));
        assert_eq!(size_of::<HostApi>(), 24);
        assert_eq!(
            (offset_of!(HostApi, context), offset_of!(HostApi, log)),
            (8, 16)
        );
        assert_eq!(size_of::<Descriptor>(), 80);
        assert_eq!(
            [
                offset_of!(Descriptor, magic),
                offset_of!(Descriptor, abi_major),
                offset_of!(Descriptor, abi_minor),
                offset_of!(Descriptor, size),
                offset_of!(Descriptor, name),
                offset_of!(Descriptor, version),
                offset_of!(Descriptor, init),
                offset_of!(Descriptor, free_buf),
                offset_of!(Descriptor, kms),
                offset_of!(Descriptor, store),
            ],
            [0, 8, 10, 12, 16, 32, 48, 56, 64, 72]
        );
        assert_eq!(size_of::<KmsTable>(), 64);
        assert_eq!(
            [
                offset_of!(KmsTable, provider),
                offset_of!(KmsTable, create),
                offset_of!(KmsTable, destroy),
                offset_of!(KmsTable, wrap),
                offset_of!(KmsTable, unwrap),
                offset_of!(KmsTable, health),
            ],
            [8, 24, 32, 40, 48, 56]
        );
        assert_eq!(size_of::<StoreTable>(), 72);
        assert_eq!(
            [
                offset_of!(StoreTable, name),
                offset_of!(StoreTable, open),
                offset_of!(StoreTable, close),
                offset_of!(StoreTable, get),
                offset_of!(StoreTable, get_many),
                offset_of!(StoreTable, scan),
                offset_of!(StoreTable, write),
            ],
            [8, 24, 32, 40, 48, 56, 64]
        );
        assert_eq!(MAGIC.to_le_bytes(), *b"SEALDBPL");
    }
}
