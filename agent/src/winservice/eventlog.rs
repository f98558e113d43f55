//! The Windows Application event log, source `Estafeta`: where the service says why it refused
//! to start when its own log is not open yet (the env file that names the log folder is the
//! thing it refused to read). The source needs no registration to write; without a message
//! file Event Viewer prefixes the text with "The description for Event ID 1 … cannot be
//! found", and the text follows in full.

/// The event ID of "the service refused to start".
pub const START_REFUSED_EVENT_ID: u32 = 1;

/// Writes `message` as an error event; returns whether Windows accepted it. Never fails the
/// caller: the refusal also goes to stderr and the service's exit code.
#[allow(unsafe_code)] // Win32 event log API, with NUL-terminated UTF-16 strings owned here.
pub fn report_error(message: &str) -> bool {
    use windows_sys::Win32::System::EventLog::{
        DeregisterEventSource, EVENTLOG_ERROR_TYPE, RegisterEventSourceW, ReportEventW,
    };
    let source: Vec<u16> = super::SERVICE_NAME.encode_utf16().chain([0]).collect();
    // One event string holds at most 31,839 characters; a refusal is a few hundred.
    let text: Vec<u16> = message.encode_utf16().take(31_000).chain([0]).collect();
    // SAFETY: `source` is NUL-terminated and outlives the call.
    let handle = unsafe { RegisterEventSourceW(std::ptr::null(), source.as_ptr()) };
    if handle.is_null() {
        return false;
    }
    let strings = [text.as_ptr()];
    // SAFETY: `handle` is open; one string, NUL-terminated, alive during the call; no raw data.
    let written = unsafe {
        ReportEventW(
            handle,
            EVENTLOG_ERROR_TYPE,
            0,
            START_REFUSED_EVENT_ID,
            std::ptr::null_mut(),
            1,
            0,
            strings.as_ptr(),
            std::ptr::null(),
        )
    } != 0;
    // SAFETY: `handle` came from RegisterEventSourceW and is closed once.
    unsafe { DeregisterEventSource(handle) };
    written
}
