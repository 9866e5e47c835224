//! Loading plugin libraries and calling through their tables: the only `unsafe` on the host
//! side. Everything a plugin hands back is checked before use: the magic, the ABI major
//! version, the sizes of the descriptor and of each table (fields past a reported size are
//! never read), UTF-8 of names. Libraries are never unloaded.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::path::{Path, PathBuf};

use sealdb_plugin_api::abi::{self, status, Buf, Bytes, Descriptor, HostApi, KmsTable, StoreTable};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

/// The 1.0 sizes: a plugin reporting less is refused; fields appended in later minor versions
/// are read only when the reported size covers them.
const DESCRIPTOR_1_0: usize = std::mem::size_of::<Descriptor>();
const KMS_TABLE_1_0: usize = std::mem::size_of::<KmsTable>();
const STORE_TABLE_1_0: usize = std::mem::size_of::<StoreTable>();

/// The descriptor's fixed head, readable before anything else is trusted.
#[repr(C)]
struct Head {
    magic: u64,
    abi_major: u16,
    abi_minor: u16,
    size: u32,
}

/// A loaded plugin library.
pub struct Plugin {
    pub name: String,
    pub version: String,
    pub path: PathBuf,
    pub abi_minor: u16,
    desc: &'static Descriptor,
    pub kms: Option<&'static KmsTable>,
    pub store: Option<&'static StoreTable>,
    /// The provider name of `kms`, when present.
    pub kms_provider: Option<String>,
    /// The store name of `store`, when present.
    pub store_name: Option<String>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A handle a plugin returned (an instance pointer). Plugins must accept calls on one handle
/// from several threads at once (docs/plugins.md; `declare_plugin!` requires `Send + Sync`).
#[derive(Clone, Copy)]
pub struct Handle(pub *mut c_void);
// SAFETY: see the type's documentation: the ABI makes handles shareable across threads.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

/// One call's result: the status and what the plugin wrote to `out`, copied out and released.
pub struct Reply {
    pub status: u32,
    pub bytes: Vec<u8>,
}

impl Reply {
    /// The plugin's message for a failed call.
    pub fn message(&self) -> String {
        let m = String::from_utf8_lossy(&self.bytes).into_owned();
        if m.is_empty() {
            format!("status {}", self.status)
        } else {
            m
        }
    }
}

fn str_of(b: Bytes, what: &str) -> Result<String, String> {
    // SAFETY: descriptor strings are 'static data of a library that is never unloaded.
    let s = unsafe { b.as_slice() };
    if s.len() > 4096 {
        return Err(format!("its {what} is implausibly long"));
    }
    std::str::from_utf8(s)
        .map(str::to_owned)
        .map_err(|_| format!("its {what} is not UTF-8"))
}

extern "C" fn host_log(context: *const c_void, level: u32, message: Bytes) {
    // SAFETY: the plugin passes a message valid for the call.
    let msg = String::from_utf8_lossy(unsafe { message.as_slice() });
    // SAFETY: `context` is the leaked, never-freed name string given in `HostApi`.
    let name: &str = if context.is_null() {
        "?"
    } else {
        unsafe { &*(context as *const String) }
    };
    match level {
        abi::level::ERROR => tracing::error!(plugin = name, "{msg}"),
        abi::level::WARN => tracing::warn!(plugin = name, "{msg}"),
        abi::level::DEBUG => tracing::debug!(plugin = name, "{msg}"),
        _ => tracing::info!(plugin = name, "{msg}"),
    }
}

/// The hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// Load, check and initialise one plugin library. Every error names the reason; the caller
/// adds the file.
pub fn load(path: &Path, sha256: Option<&str>) -> Result<Plugin, String> {
    if !path.is_file() {
        return Err("no such file".into());
    }
    if let Some(want) = sha256 {
        let have = sha256_file(path)?;
        if !have.eq_ignore_ascii_case(want.trim()) {
            return Err(format!(
                "sha256 mismatch: the file has {have}, the configuration expects {}",
                want.trim()
            ));
        }
    }
    // SAFETY: loading a library runs its initialisers. The operator named this file in the
    // configuration (and can pin its hash above); that trust is the premise of plugins.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("not a loadable library: {e}"))?;
    // Never unloaded: unloading Rust libraries with thread-locals crashes at exit.
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    let symbol = format!("{}\0", abi::ENTRY_SYMBOL);
    // SAFETY: the symbol is declared by the ABI as `extern "C" fn() -> *const Descriptor`.
    let entry: libloading::Symbol<'static, extern "C" fn() -> *const Descriptor> =
        unsafe { lib.get(symbol.as_bytes()) }.map_err(|_| {
            format!(
                "not a SealDB plugin: it does not export {}",
                abi::ENTRY_SYMBOL
            )
        })?;
    let d = entry();
    if d.is_null() {
        return Err(format!("{} returned no descriptor", abi::ENTRY_SYMBOL));
    }
    // SAFETY: every descriptor version starts with this head; only it is read before checks.
    let head = unsafe { &*(d as *const Head) };
    if head.magic != abi::MAGIC {
        return Err("not a SealDB plugin: its descriptor has the wrong magic number".into());
    }
    if head.abi_major != abi::ABI_MAJOR {
        return Err(format!(
            "ABI version {}.{} is not supported by this server (ABI {}.{}): rebuild the plugin against sealdb-plugin-api {}",
            head.abi_major, head.abi_minor, abi::ABI_MAJOR, abi::ABI_MINOR, abi::ABI_MAJOR
        ));
    }
    if (head.size as usize) < DESCRIPTOR_1_0 {
        return Err(format!(
            "its descriptor is {} bytes, smaller than ABI 1.0's {DESCRIPTOR_1_0}",
            head.size
        ));
    }
    // SAFETY: magic, major version and size say this is (at least) a 1.0 descriptor.
    let desc: &'static Descriptor = unsafe { &*d };
    let name = str_of(desc.name, "name")?;
    let version = str_of(desc.version, "version")?;
    let kms = if desc.kms.is_null() {
        None
    } else {
        // SAFETY: a non-null table pointer of a checked descriptor points to a 'static table.
        let t: &'static KmsTable = unsafe { &*desc.kms };
        if (t.size as usize) < KMS_TABLE_1_0 {
            return Err("its KMS table is smaller than ABI 1.0's".into());
        }
        Some(t)
    };
    let store = if desc.store.is_null() {
        None
    } else {
        // SAFETY: as above.
        let t: &'static StoreTable = unsafe { &*desc.store };
        if (t.size as usize) < STORE_TABLE_1_0 {
            return Err("its store table is smaller than ABI 1.0's".into());
        }
        Some(t)
    };
    if kms.is_none() && store.is_none() {
        return Err("it offers neither a KMS provider nor a store".into());
    }
    let kms_provider = kms
        .map(|t| str_of(t.provider, "KMS provider name"))
        .transpose()?;
    let store_name = store.map(|t| str_of(t.name, "store name")).transpose()?;
    let plugin = Plugin {
        kms_provider,
        store_name,
        name: name.clone(),
        version,
        path: path.to_path_buf(),
        abi_minor: head.abi_minor,
        desc,
        kms,
        store,
    };
    // The host table and the plugin's name (the log context) live for the process.
    let context: &'static String = Box::leak(Box::new(name));
    let host: &'static HostApi = Box::leak(Box::new(HostApi {
        size: std::mem::size_of::<HostApi>() as u32,
        context: context as *const String as *const c_void,
        log: host_log,
    }));
    let reply = plugin.call(false, |out| (desc.init)(host, out));
    if reply.status != status::OK {
        return Err(format!("its init failed: {}", reply.message()));
    }
    Ok(plugin)
}

impl Plugin {
    /// Make one call with a fresh `out` buffer; copy the result and release the plugin's
    /// buffer (wiped first when `secret`).
    pub fn call(&self, secret: bool, f: impl FnOnce(*mut Buf) -> u32) -> Reply {
        let mut out = Buf::EMPTY;
        let status = f(&mut out);
        let bytes = if out.ptr.is_null() || out.len == 0 {
            Vec::new()
        } else {
            // SAFETY: the plugin filled `out` with a buffer of `len` initialised bytes that it
            // owns until we release it below.
            unsafe { std::slice::from_raw_parts(out.ptr, out.len) }.to_vec()
        };
        if secret && !out.ptr.is_null() {
            // SAFETY: as above; we still own the buffer and wipe it before releasing it.
            unsafe { std::slice::from_raw_parts_mut(out.ptr, out.len) }.zeroize();
        }
        if !out.ptr.is_null() {
            (self.desc.free_buf)(out);
        }
        Reply { status, bytes }
    }

    /// Call `create`/`open` of a table: the handle, or the failure's message.
    pub fn make(
        &self,
        f: impl FnOnce(*mut *mut c_void, *mut Buf) -> u32,
    ) -> Result<(Handle, Vec<u8>), String> {
        let mut h: *mut c_void = std::ptr::null_mut();
        let reply = self.call(false, |out| f(&mut h, out));
        if reply.status != status::OK {
            return Err(reply.message());
        }
        if h.is_null() {
            return Err("the plugin returned no handle".into());
        }
        Ok((Handle(h), reply.bytes))
    }
}
