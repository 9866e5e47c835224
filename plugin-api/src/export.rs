//! The plugin side of the C ABI: what [`declare_plugin!`](crate::declare_plugin) expands to.
//!
//! Each function here is one export of a plugin library, generic over the plugin's own safe
//! types. Every one catches panics (a panic becomes [`status::INTERNAL`] with its message) and
//! never unwinds across the boundary. Plugin authors do not call these directly.

#![allow(unsafe_code)]
// These are the ABI's entry points: raw pointers are their arguments by definition, and the
// ABI contract (docs/plugins.md) is what makes each dereference valid.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use crate::abi::{codec, flat_json, level, status, Buf, Bytes, HostApi};
use crate::kms::{BlockingKmsProvider, KmsError, SlotFields};
use crate::store::{IndexStore, StoreError};

/// The host's log callback and its context (set once by `init`).
struct HostLog {
    log: extern "C" fn(*const c_void, u32, Bytes),
    context: usize,
}

static HOST_LOG: OnceLock<HostLog> = OnceLock::new();

/// Log through the server's `tracing` (after `init`; before it, to stderr). Never log keys.
pub fn host_log(lvl: u32, message: &str) {
    match HOST_LOG.get() {
        Some(h) => (h.log)(
            h.context as *const c_void,
            lvl,
            Bytes::of(message.as_bytes()),
        ),
        None => eprintln!("[plugin] {message}"),
    }
}

/// Log at info level through the host.
pub fn log_info(message: &str) {
    host_log(level::INFO, message)
}

/// Log at warn level through the host.
pub fn log_warn(message: &str) {
    host_log(level::WARN, message)
}

fn set_out(out: *mut Buf, bytes: Vec<u8>) {
    if !out.is_null() {
        // SAFETY: `out` points to a Buf the host owns for this call (ABI contract); the host
        // initialised it to Buf::EMPTY, so nothing is overwritten that needed freeing.
        unsafe { out.write(Buf::from_vec(bytes)) };
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".into()
    }
}

/// Run `f`; its `Ok` bytes or its error message go to `out`; a panic becomes INTERNAL.
fn guard(out: *mut Buf, f: impl FnOnce() -> Result<Vec<u8>, (u32, String)>) -> u32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(bytes)) => {
            set_out(out, bytes);
            status::OK
        }
        Ok(Err((code, msg))) => {
            set_out(out, msg.into_bytes());
            code
        }
        Err(p) => {
            set_out(
                out,
                format!("plugin panicked: {}", panic_message(p)).into_bytes(),
            );
            status::INTERNAL
        }
    }
}

fn input<'a>(b: Bytes) -> &'a [u8] {
    // SAFETY: inputs are borrowed for the duration of the call (ABI contract), and no caller
    // here keeps the slice past the call.
    unsafe { b.as_slice() }
}

fn kms_status(e: KmsError) -> (u32, String) {
    let code = match &e {
        KmsError::Denied(_) => status::DENIED,
        KmsError::Unavailable(_) => status::UNAVAILABLE,
        KmsError::Unwrap(_) => status::CANNOT_UNWRAP,
        KmsError::Config(_) => status::INVALID,
    };
    let msg = match e {
        KmsError::Denied(m)
        | KmsError::Unavailable(m)
        | KmsError::Unwrap(m)
        | KmsError::Config(m) => m,
    };
    (code, msg)
}

fn store_status(e: StoreError) -> (u32, String) {
    match e {
        StoreError::Io(m) => (status::INTERNAL, m),
        StoreError::Corrupt(m) => (status::INVALID, m),
        StoreError::Unavailable(m) | StoreError::Conflict(m) => (status::UNAVAILABLE, m),
    }
}

fn text<'a>(b: Bytes) -> Result<&'a str, (u32, String)> {
    std::str::from_utf8(input(b)).map_err(|_| (status::INVALID, "config is not UTF-8".into()))
}

fn handle_ref<'a, T>(h: *const c_void) -> Result<&'a T, (u32, String)> {
    if h.is_null() {
        return Err((status::INVALID, "null handle".into()));
    }
    // SAFETY: non-null handles are only ever what `kms_create`/`store_open` of this library
    // returned for type T, alive until destroy/close (ABI contract).
    Ok(unsafe { &*(h as *const T) })
}

fn set_handle<T>(handle: *mut *mut c_void, value: T) -> Result<(), (u32, String)> {
    if handle.is_null() {
        return Err((status::INVALID, "null handle pointer".into()));
    }
    let raw = Box::into_raw(Box::new(value)) as *mut c_void;
    // SAFETY: `handle` points to a pointer slot the host owns for this call.
    unsafe { handle.write(raw) };
    Ok(())
}

fn drop_handle<T>(h: *mut c_void) {
    if !h.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: `h` came from Box::into_raw in set_handle::<T> and is released once.
            drop(unsafe { Box::from_raw(h as *mut T) })
        }));
    }
}

/// `Descriptor::init`.
pub extern "C" fn init(host: *const HostApi, out: *mut Buf) -> u32 {
    guard(out, || {
        if host.is_null() {
            return Err((status::INVALID, "no host API".into()));
        }
        // SAFETY: the host passes a HostApi that lives for the whole process.
        let api = unsafe { &*host };
        if (api.size as usize) < std::mem::size_of::<HostApi>() {
            return Err((status::INVALID, "host API table too small".into()));
        }
        let _ = HOST_LOG.set(HostLog {
            log: api.log,
            context: api.context as usize,
        });
        Ok(Vec::new())
    })
}

/// `Descriptor::free_buf`.
pub extern "C" fn free_buf(buf: Buf) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the host returns each Buf this library made exactly once.
        drop(unsafe { buf.into_vec() })
    }));
}

/// `KmsTable::create`, with the plugin's constructor.
pub fn kms_create<T: BlockingKmsProvider>(
    config: Bytes,
    handle: *mut *mut c_void,
    out: *mut Buf,
    make: fn(&SlotFields) -> Result<T, KmsError>,
) -> u32 {
    guard(out, || {
        let fields = flat_json::decode(text(config)?)
            .map_err(|e| (status::INVALID, format!("slot fields: {e}")))?;
        let p = make(&fields).map_err(kms_status)?;
        let mut info = p.key_id().as_bytes().to_vec();
        info.push(0);
        info.extend_from_slice(p.region().as_bytes());
        set_handle(handle, p)?;
        Ok(info)
    })
}

/// `KmsTable::destroy`.
pub extern "C" fn kms_destroy<T: BlockingKmsProvider>(h: *mut c_void) {
    drop_handle::<T>(h)
}

/// `KmsTable::wrap`.
pub extern "C" fn kms_wrap<T: BlockingKmsProvider>(
    h: *const c_void,
    kek: Bytes,
    context: Bytes,
    out: *mut Buf,
) -> u32 {
    guard(out, || {
        let w = handle_ref::<T>(h)?
            .wrap(input(kek), input(context))
            .map_err(kms_status)?;
        let mut v = (w.ciphertext.len() as u32).to_le_bytes().to_vec();
        v.extend_from_slice(&w.ciphertext);
        v.extend_from_slice(w.key_version.as_bytes());
        Ok(v)
    })
}

/// `KmsTable::unwrap`.
pub extern "C" fn kms_unwrap<T: BlockingKmsProvider>(
    h: *const c_void,
    wrapped: Bytes,
    context: Bytes,
    out: *mut Buf,
) -> u32 {
    guard(out, || {
        let key = handle_ref::<T>(h)?
            .unwrap(input(wrapped), input(context))
            .map_err(kms_status)?;
        // The copy crosses to the host, which wipes it before freeing; ours is wiped on drop.
        Ok(key.to_vec())
    })
}

/// `KmsTable::health`.
pub extern "C" fn kms_health<T: BlockingKmsProvider>(h: *const c_void, out: *mut Buf) -> u32 {
    guard(out, || {
        handle_ref::<T>(h)?.health().map_err(kms_status)?;
        Ok(Vec::new())
    })
}

/// `StoreTable::open`, with the plugin's constructor (given the config JSON text).
pub fn store_open<S: IndexStore>(
    config: Bytes,
    handle: *mut *mut c_void,
    out: *mut Buf,
    open: fn(&str) -> Result<S, StoreError>,
) -> u32 {
    guard(out, || {
        let s = open(text(config)?).map_err(store_status)?;
        set_handle(handle, s)?;
        Ok(Vec::new())
    })
}

/// `StoreTable::close`.
pub extern "C" fn store_close<S: IndexStore>(h: *mut c_void) {
    drop_handle::<S>(h)
}

/// `StoreTable::get`.
pub extern "C" fn store_get<S: IndexStore>(h: *const c_void, key: Bytes, out: *mut Buf) -> u32 {
    guard(out, || {
        match handle_ref::<S>(h)?.get(input(key)).map_err(store_status)? {
            Some(v) => Ok(v),
            None => Err((status::NOT_FOUND, String::new())),
        }
    })
}

/// `StoreTable::get_many`.
pub extern "C" fn store_get_many<S: IndexStore>(
    h: *const c_void,
    keys: Bytes,
    out: *mut Buf,
) -> u32 {
    guard(out, || {
        let keys = codec::decode_list(input(keys)).map_err(|e| (status::INVALID, e))?;
        let vals = handle_ref::<S>(h)?.get_many(&keys).map_err(store_status)?;
        Ok(codec::encode_options(&vals))
    })
}

/// `StoreTable::scan`.
pub extern "C" fn store_scan<S: IndexStore>(
    h: *const c_void,
    prefix: Bytes,
    keys_only: u8,
    out: *mut Buf,
) -> u32 {
    guard(out, || {
        let s = handle_ref::<S>(h)?;
        if keys_only != 0 {
            Ok(codec::encode_list(
                &s.scan_keys(input(prefix)).map_err(store_status)?,
            ))
        } else {
            Ok(codec::encode_pairs(
                &s.scan_prefix(input(prefix)).map_err(store_status)?,
            ))
        }
    })
}

/// `StoreTable::write`.
pub extern "C" fn store_write<S: IndexStore>(h: *const c_void, batch: Bytes, out: *mut Buf) -> u32 {
    guard(out, || {
        let b = codec::decode_batch(input(batch)).map_err(|e| (status::INVALID, e))?;
        handle_ref::<S>(h)?.write(b).map_err(store_status)?;
        Ok(Vec::new())
    })
}

/// Turn plain safe Rust into a plugin library's exports (see `docs/plugins.md`).
///
/// ```ignore
/// sealdb_plugin_api::declare_plugin! {
///     name: "my-plugin",
///     version: env!("CARGO_PKG_VERSION"),
///     kms: { provider: "my-kms", instance: MyKms, create: MyKms::from_fields },
///     store: { name: "my-store", instance: MyStore, open: MyStore::open },
/// }
/// ```
/// `kms` and `store` are each optional (at least one makes sense). `create` is a
/// `fn(&SlotFields) -> Result<T, KmsError>` with `T: BlockingKmsProvider`; `open` is a
/// `fn(&str /* JSON */) -> Result<S, StoreError>` with `S: IndexStore`. The crate must be a
/// `cdylib` built with `panic = "unwind"` (the default), so that panics can be caught.
#[macro_export]
macro_rules! declare_plugin {
    (
        name: $name:expr,
        version: $version:expr
        $(, kms: { provider: $kp:expr, instance: $kt:ty, create: $kc:expr $(,)? })?
        $(, store: { name: $sn:expr, instance: $st:ty, open: $so:expr $(,)? })?
        $(,)?
    ) => {
        const _: () = {
            use $crate::abi as __abi;
            $(
                extern "C" fn __sealdb_kms_create(
                    config: __abi::Bytes,
                    handle: *mut *mut ::std::ffi::c_void,
                    out: *mut __abi::Buf,
                ) -> u32 {
                    $crate::export::kms_create::<$kt>(config, handle, out, $kc)
                }
                static __SEALDB_KMS: __abi::KmsTable = __abi::KmsTable {
                    size: ::std::mem::size_of::<__abi::KmsTable>() as u32,
                    provider: __abi::Bytes::of(($kp as &str).as_bytes()),
                    create: __sealdb_kms_create,
                    destroy: $crate::export::kms_destroy::<$kt>,
                    wrap: $crate::export::kms_wrap::<$kt>,
                    unwrap: $crate::export::kms_unwrap::<$kt>,
                    health: $crate::export::kms_health::<$kt>,
                };
            )?
            $(
                extern "C" fn __sealdb_store_open(
                    config: __abi::Bytes,
                    handle: *mut *mut ::std::ffi::c_void,
                    out: *mut __abi::Buf,
                ) -> u32 {
                    $crate::export::store_open::<$st>(config, handle, out, $so)
                }
                static __SEALDB_STORE: __abi::StoreTable = __abi::StoreTable {
                    size: ::std::mem::size_of::<__abi::StoreTable>() as u32,
                    name: __abi::Bytes::of(($sn as &str).as_bytes()),
                    open: __sealdb_store_open,
                    close: $crate::export::store_close::<$st>,
                    get: $crate::export::store_get::<$st>,
                    get_many: $crate::export::store_get_many::<$st>,
                    scan: $crate::export::store_scan::<$st>,
                    write: $crate::export::store_write::<$st>,
                };
            )?
            static __SEALDB_DESCRIPTOR: __abi::Descriptor = __abi::Descriptor {
                magic: __abi::MAGIC,
                abi_major: __abi::ABI_MAJOR,
                abi_minor: __abi::ABI_MINOR,
                size: ::std::mem::size_of::<__abi::Descriptor>() as u32,
                name: __abi::Bytes::of(($name as &str).as_bytes()),
                version: __abi::Bytes::of(($version as &str).as_bytes()),
                init: $crate::export::init,
                free_buf: $crate::export::free_buf,
                kms: $crate::__sealdb_ptr!($(&__SEALDB_KMS, $kp)?),
                store: $crate::__sealdb_ptr!($(&__SEALDB_STORE, $sn)?),
            };
            #[no_mangle]
            pub extern "C" fn sealdb_plugin_entry_v1() -> *const __abi::Descriptor {
                &__SEALDB_DESCRIPTOR
            }
        };
    };
}

/// `null` when a table is absent, its address otherwise (used by `declare_plugin!`).
#[doc(hidden)]
#[macro_export]
macro_rules! __sealdb_ptr {
    () => {
        ::std::ptr::null()
    };
    ($table:expr, $_name:expr) => {
        $table as *const _
    };
}
