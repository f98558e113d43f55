//! Whether the service may trust a file in its data folder: its env file and its ingest token
//! decide where patient data go and who may stage records, and the service runs as LocalSystem,
//! so a file that a standard user owns or can write is a planted configuration (THREATS.md: a
//! local user on a shared workstation). The decision is portable and tested on every platform
//! ([`check_trusted`] takes SID strings and access masks); only reading a real file's owner and
//! access list is Windows code ([`read`]).
//!
//! The account running estafeta is trusted too: a file only it can change crosses no privilege
//! (LocalSystem is SYSTEM already; under Wine everything runs as, and is owned by, one user).
//!
//! Only allow entries count: a deny entry never gives anyone a right, and the order-dependent
//! evaluation it takes part in is not needed to prove "nobody else can write".

use std::fmt;
use std::path::Path;

/// LocalSystem, the account the service runs as.
pub const SYSTEM_SID: &str = "S-1-5-18";
/// BUILTIN\Administrators.
pub const ADMINISTRATORS_SID: &str = "S-1-5-32-544";
/// NT SERVICE\TrustedInstaller, which owns what Windows itself installs.
pub const TRUSTED_INSTALLER_SID: &str =
    "S-1-5-80-956008885-3418522649-1831038044-1853292631-2271478464";

/// The accounts that may own or change a file the service trusts.
const TRUSTED_SIDS: [&str; 3] = [SYSTEM_SID, ADMINISTRATORS_SID, TRUSTED_INSTALLER_SID];

/// The access rights that let their holder change what the service reads, directly (write,
/// append), by replacing the file (delete), or by granting themselves the rest (the access list
/// and the owner); with the words the refusal uses for each.
const WRITE_RIGHTS: [(u32, &str); 7] = [
    (0x0000_0002, "write"),                  // FILE_WRITE_DATA
    (0x0000_0004, "append"),                 // FILE_APPEND_DATA
    (0x0001_0000, "delete"),                 // DELETE
    (0x0004_0000, "change its permissions"), // WRITE_DAC
    (0x0008_0000, "take ownership"),         // WRITE_OWNER
    (0x4000_0000, "generic write"),          // GENERIC_WRITE
    (0x1000_0000, "full control"),           // GENERIC_ALL
];

/// Whether an access control entry grants or denies its rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AceKind {
    /// An access-allowed entry.
    Allow,
    /// An access-denied entry.
    Deny,
}

/// One entry of a file's access list (DACL), with its SID in string form (`S-1-5-32-545`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ace {
    /// Who the entry is for.
    pub sid: String,
    /// The rights, as the Win32 access mask.
    pub mask: u32,
    /// Allowed or denied.
    pub kind: AceKind,
}

/// Why a file may not be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Untrusted {
    /// The owner is not SYSTEM, Administrators or TrustedInstaller: an owner can always rewrite
    /// the access list, whatever it says now.
    Owner {
        /// The owner's SID.
        owner: String,
    },
    /// An allow entry lets another account change the file.
    Writable {
        /// Who may change it.
        sid: String,
        /// What they may do, in words ("write", "full control").
        rights: Vec<&'static str>,
    },
}

impl fmt::Display for Untrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Untrusted::Owner { owner } => write!(
                f,
                "it is owned by {}, not by SYSTEM or Administrators",
                describe_sid(owner)
            ),
            Untrusted::Writable { sid, rights } => write!(
                f,
                "{} may change it ({})",
                describe_sid(sid),
                rights.join(", ")
            ),
        }
    }
}

/// Ok when only SYSTEM, Administrators, TrustedInstaller and `running_as` (the SID of the
/// account running estafeta) own or may change the file; else the first reason not to trust
/// it (the owner first, then the entries in their order).
pub fn check_trusted(owner: &str, aces: &[Ace], running_as: &str) -> Result<(), Untrusted> {
    let is_trusted = |sid: &str| {
        sid.eq_ignore_ascii_case(running_as)
            || TRUSTED_SIDS.iter().any(|t| t.eq_ignore_ascii_case(sid))
    };
    if !is_trusted(owner) {
        return Err(Untrusted::Owner {
            owner: owner.to_owned(),
        });
    }
    for ace in aces {
        if ace.kind != AceKind::Allow || is_trusted(&ace.sid) {
            continue;
        }
        let rights: Vec<&'static str> = WRITE_RIGHTS
            .iter()
            .filter(|(bit, _)| ace.mask & bit != 0)
            .map(|(_, word)| *word)
            .collect();
        if !rights.is_empty() {
            return Err(Untrusted::Writable {
                sid: ace.sid.clone(),
                rights,
            });
        }
    }
    Ok(())
}

/// A well-known SID with its English name, so that the refusal says who ("Users (S-1-5-32-545)");
/// any other SID as it is (an account's SID is looked up with `wmic useraccount` or PowerShell).
pub fn describe_sid(sid: &str) -> String {
    let name = match sid {
        "S-1-1-0" => "Everyone",
        "S-1-5-11" => "Authenticated Users",
        "S-1-5-4" => "INTERACTIVE",
        "S-1-5-32-545" => "Users",
        "S-1-5-32-546" => "Guests",
        "S-1-5-32-547" => "Power Users",
        "S-1-3-0" => "CREATOR OWNER",
        "S-1-3-4" => "OWNER RIGHTS",
        "S-1-5-7" => "ANONYMOUS LOGON",
        SYSTEM_SID => "SYSTEM",
        ADMINISTRATORS_SID => "Administrators",
        TRUSTED_INSTALLER_SID => "TrustedInstaller",
        _ => return format!("the account {sid}"),
    };
    format!("{name} ({sid})")
}

/// The commands an administrator runs to give `path` back to Administrators with only SYSTEM
/// and Administrators allowed (after checking its content: it may have been planted).
pub fn reset_command(path: &Path) -> String {
    let p = path.display();
    format!(
        "icacls \"{p}\" /setowner *{ADMINISTRATORS_SID} && icacls \"{p}\" /reset && icacls \"{p}\" /inheritance:r /grant:r *{SYSTEM_SID}:F *{ADMINISTRATORS_SID}:F"
    )
}

/// The refusal for `path`: which file, who can change it, and what to do.
pub fn refusal(path: &Path, why: &Untrusted) -> String {
    format!(
        "the service will not start: {} may have been planted, because {why}; the service runs as SYSTEM and reads it before anything else. As an administrator, check its content (every setting, and the token), then run: {}",
        path.display(),
        reset_command(path)
    )
}

/// Reads `path`'s owner and access list. A missing access list (a NULL DACL, which grants
/// everyone everything) comes back as Everyone with full control; entries that only pass on
/// to children (inherit-only) are left out, they do not apply to the file.
#[cfg(windows)]
#[allow(unsafe_code)] // Win32 security API: raw pointers owned by the returned descriptor.
pub fn read(path: &Path) -> std::io::Result<(String, Vec<Ace>)> {
    use std::os::windows::ffi::OsStrExt as _;
    use windows_sys::Win32::Foundation::{ERROR_SUCCESS, LocalFree};
    use windows_sys::Win32::Security::Authorization::{GetNamedSecurityInfoW, SE_FILE_OBJECT};
    use windows_sys::Win32::Security::{
        ACCESS_ALLOWED_ACE, ACE_HEADER, ACL, ACL_SIZE_INFORMATION, AclSizeInformation,
        DACL_SECURITY_INFORMATION, GetAce, GetAclInformation, INHERIT_ONLY_ACE,
        OWNER_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR, PSID,
    };

    // The entry types whose layout is header, mask, SID (winnt.h).
    const ACCESS_ALLOWED_ACE_TYPE: u8 = 0;
    const ACCESS_DENIED_ACE_TYPE: u8 = 1;
    const ACCESS_ALLOWED_CALLBACK_ACE_TYPE: u8 = 9;
    const ACCESS_DENIED_CALLBACK_ACE_TYPE: u8 = 10;

    /// Frees the security descriptor however `read` returns.
    struct Descriptor(PSECURITY_DESCRIPTOR);
    impl Drop for Descriptor {
        fn drop(&mut self) {
            if !self.0.is_null() {
                // SAFETY: allocated by GetNamedSecurityInfoW, freed once here.
                unsafe { LocalFree(self.0) };
            }
        }
    }

    let wide: Vec<u16> = path.as_os_str().encode_wide().chain([0]).collect();
    let mut owner: PSID = std::ptr::null_mut();
    let mut dacl: *mut ACL = std::ptr::null_mut();
    let mut descriptor: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: `wide` is NUL-terminated; the out pointers point into `descriptor`, which lives
    // until `_guard` drops at the end of this function.
    let status = unsafe {
        GetNamedSecurityInfoW(
            wide.as_ptr(),
            SE_FILE_OBJECT,
            OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION,
            &mut owner,
            std::ptr::null_mut(),
            &mut dacl,
            std::ptr::null_mut(),
            &mut descriptor,
        )
    };
    let _guard = Descriptor(descriptor);
    if status != ERROR_SUCCESS {
        return Err(std::io::Error::from_raw_os_error(status as i32));
    }
    if owner.is_null() {
        return Err(std::io::Error::other("the file has no owner"));
    }
    let owner = sid_string(owner)?;
    if dacl.is_null() {
        let everyone = Ace {
            sid: "S-1-1-0".into(),
            mask: 0x1000_0000,
            kind: AceKind::Allow,
        };
        return Ok((owner, vec![everyone]));
    }
    let mut size = ACL_SIZE_INFORMATION::default();
    // SAFETY: `dacl` is a valid ACL inside the descriptor; `size` is the class's struct.
    if unsafe {
        GetAclInformation(
            dacl,
            (&mut size as *mut ACL_SIZE_INFORMATION).cast(),
            std::mem::size_of::<ACL_SIZE_INFORMATION>() as u32,
            AclSizeInformation,
        )
    } == 0
    {
        return Err(std::io::Error::last_os_error());
    }
    let mut aces = Vec::with_capacity(size.AceCount as usize);
    for index in 0..size.AceCount {
        let mut entry: *mut core::ffi::c_void = std::ptr::null_mut();
        // SAFETY: `index` is below the ACL's entry count.
        if unsafe { GetAce(dacl, index, &mut entry) } == 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: every entry starts with an ACE_HEADER.
        let header = unsafe { *(entry as *const ACE_HEADER) };
        if u32::from(header.AceFlags) & INHERIT_ONLY_ACE != 0 {
            continue;
        }
        let kind = match header.AceType {
            ACCESS_ALLOWED_ACE_TYPE | ACCESS_ALLOWED_CALLBACK_ACE_TYPE => AceKind::Allow,
            ACCESS_DENIED_ACE_TYPE | ACCESS_DENIED_CALLBACK_ACE_TYPE => AceKind::Deny,
            other => {
                // Object entries (directory-service objects) never appear on NTFS files; one
                // that does is not understood, so the file is not trusted.
                return Err(std::io::Error::other(format!(
                    "its access list holds an entry of type {other} that the service does not read"
                )));
            }
        };
        let body = entry as *const ACCESS_ALLOWED_ACE;
        // SAFETY: these four types share ACCESS_ALLOWED_ACE's layout: header, mask, SID.
        let (mask, sid) = unsafe { ((*body).Mask, std::ptr::addr_of!((*body).SidStart) as PSID) };
        aces.push(Ace {
            sid: sid_string(sid)?,
            mask,
            kind,
        });
    }
    Ok((owner, aces))
}

/// A SID in string form (`S-1-5-18`).
#[cfg(windows)]
#[allow(unsafe_code)] // Win32 API: a string allocated by Windows, freed here.
fn sid_string(sid: windows_sys::Win32::Security::PSID) -> std::io::Result<String> {
    use windows_sys::Win32::Foundation::LocalFree;
    use windows_sys::Win32::Security::Authorization::ConvertSidToStringSidW;
    let mut text: *mut u16 = std::ptr::null_mut();
    // SAFETY: `sid` points into a live security descriptor; `text` is freed below.
    if unsafe { ConvertSidToStringSidW(sid, &mut text) } == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a NUL-terminated string allocated by ConvertSidToStringSidW.
    let len = (0..).take_while(|&i| unsafe { *text.add(i) } != 0).count();
    // SAFETY: `len` u16s were just read from it.
    let s = String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(text, len) });
    // SAFETY: allocated by ConvertSidToStringSidW, freed once.
    unsafe { LocalFree(text.cast()) };
    Ok(s)
}

/// The SID of the account running this process (`S-1-5-18` for the service).
#[cfg(windows)]
#[allow(unsafe_code)] // Win32 token API: a handle closed here, a buffer owned here.
pub fn current_user() -> std::io::Result<String> {
    use windows_sys::Win32::Foundation::{CloseHandle, HANDLE};
    use windows_sys::Win32::Security::{GetTokenInformation, TOKEN_QUERY, TOKEN_USER, TokenUser};
    use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcessToken};

    let mut token: HANDLE = std::ptr::null_mut();
    // SAFETY: the current process's pseudo handle; `token` is closed below.
    if unsafe { OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &mut token) } == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // TOKEN_USER and the SID after it: 256 bytes hold any SID (at most 68 bytes) with room.
    // u64 elements keep the buffer aligned for TOKEN_USER's pointer.
    let mut buffer = [0u64; 32];
    let mut needed = 0u32;
    // SAFETY: `buffer` is writable for its full size, which is passed.
    let ok = unsafe {
        GetTokenInformation(
            token,
            TokenUser,
            buffer.as_mut_ptr().cast(),
            std::mem::size_of_val(&buffer) as u32,
            &mut needed,
        )
    } != 0;
    let error = std::io::Error::last_os_error();
    // SAFETY: opened above, closed once.
    unsafe { CloseHandle(token) };
    if !ok {
        return Err(error);
    }
    // SAFETY: GetTokenInformation wrote a TOKEN_USER at the start of `buffer`, whose SID
    // pointer points into `buffer`, alive while it is read.
    let sid = unsafe { (*(buffer.as_ptr() as *const TOKEN_USER)).User.Sid };
    sid_string(sid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const USERS: &str = "S-1-5-32-545";
    const EVERYONE: &str = "S-1-1-0";
    const A_USER: &str = "S-1-5-21-1004336348-1177238915-682003330-1001";
    /// FILE_GENERIC_READ | FILE_GENERIC_EXECUTE, what `icacls` shows as (RX).
    const READ_EXECUTE: u32 = 0x0012_00a9;
    /// FILE_ALL_ACCESS, what `icacls` shows as (F).
    const FULL: u32 = 0x001f_01ff;

    fn allow(sid: &str, mask: u32) -> Ace {
        Ace {
            sid: sid.into(),
            mask,
            kind: AceKind::Allow,
        }
    }

    fn narrowed() -> Vec<Ace> {
        vec![allow(SYSTEM_SID, FULL), allow(ADMINISTRATORS_SID, FULL)]
    }

    #[test]
    fn a_file_only_system_and_administrators_control_is_trusted() {
        assert_eq!(
            check_trusted(ADMINISTRATORS_SID, &narrowed(), SYSTEM_SID),
            Ok(())
        );
        assert_eq!(check_trusted(SYSTEM_SID, &narrowed(), SYSTEM_SID), Ok(()));
        assert_eq!(
            check_trusted(TRUSTED_INSTALLER_SID, &narrowed(), SYSTEM_SID),
            Ok(())
        );
    }

    #[test]
    fn users_may_read_a_trusted_file() {
        let mut aces = narrowed();
        aces.push(allow(USERS, READ_EXECUTE));
        assert_eq!(check_trusted(ADMINISTRATORS_SID, &aces, SYSTEM_SID), Ok(()));
    }

    #[test]
    fn a_file_a_user_owns_is_refused_whatever_its_access_list() {
        assert_eq!(
            check_trusted(A_USER, &narrowed(), SYSTEM_SID),
            Err(Untrusted::Owner {
                owner: A_USER.into()
            })
        );
    }

    #[test]
    fn a_file_the_users_group_may_write_is_refused() {
        let mut aces = narrowed();
        aces.push(allow(USERS, READ_EXECUTE | 0x0000_0002));
        assert_eq!(
            check_trusted(ADMINISTRATORS_SID, &aces, SYSTEM_SID),
            Err(Untrusted::Writable {
                sid: USERS.into(),
                rights: vec!["write"]
            })
        );
    }

    #[test]
    fn a_file_everyone_has_generic_all_on_is_refused() {
        let mut aces = narrowed();
        aces.push(allow(EVERYONE, 0x1000_0000));
        let err = check_trusted(SYSTEM_SID, &aces, SYSTEM_SID).expect_err("everyone can write");
        assert_eq!(
            err,
            Untrusted::Writable {
                sid: EVERYONE.into(),
                rights: vec!["full control"]
            }
        );
        assert_eq!(
            err.to_string(),
            "Everyone (S-1-1-0) may change it (full control)"
        );
    }

    #[test]
    fn append_delete_permissions_and_ownership_each_count_as_writing() {
        for (mask, word) in [
            (0x0000_0004, "append"),
            (0x0001_0000, "delete"),
            (0x0004_0000, "change its permissions"),
            (0x0008_0000, "take ownership"),
            (0x4000_0000, "generic write"),
        ] {
            let mut aces = narrowed();
            aces.push(allow(A_USER, READ_EXECUTE | mask));
            assert_eq!(
                check_trusted(ADMINISTRATORS_SID, &aces, SYSTEM_SID),
                Err(Untrusted::Writable {
                    sid: A_USER.into(),
                    rights: vec![word]
                }),
                "mask {mask:#x}"
            );
        }
    }

    #[test]
    fn deny_entries_neither_refuse_nor_excuse() {
        let mut aces = narrowed();
        aces.push(Ace {
            sid: USERS.into(),
            mask: FULL,
            kind: AceKind::Deny,
        });
        assert_eq!(check_trusted(ADMINISTRATORS_SID, &aces, SYSTEM_SID), Ok(()));
        // A deny before a write grant does not make the grant harmless for this check.
        aces.push(allow(A_USER, FULL));
        assert!(matches!(
            check_trusted(ADMINISTRATORS_SID, &aces, SYSTEM_SID),
            Err(Untrusted::Writable { sid, .. }) if sid == A_USER
        ));
    }

    #[test]
    fn the_refusal_names_the_file_who_and_the_exact_reset_command() {
        let path = Path::new(r"C:\ProgramData\Estafeta\estafeta.env");
        let why = Untrusted::Owner {
            owner: A_USER.into(),
        };
        let text = refusal(path, &why);
        assert!(text.contains(r"C:\ProgramData\Estafeta\estafeta.env may have been planted"));
        assert!(text.contains(&format!("owned by the account {A_USER}")));
        assert!(text.contains("check its content"));
        assert!(text.ends_with(
            r#"icacls "C:\ProgramData\Estafeta\estafeta.env" /setowner *S-1-5-32-544 && icacls "C:\ProgramData\Estafeta\estafeta.env" /reset && icacls "C:\ProgramData\Estafeta\estafeta.env" /inheritance:r /grant:r *S-1-5-18:F *S-1-5-32-544:F"#
        ));
    }

    #[test]
    fn the_account_running_estafeta_trusts_its_own_file_but_not_a_group_writable_one() {
        // An administrator's console, or Wine, where one user owns everything: nothing crosses.
        let mut aces = vec![allow(A_USER, FULL)];
        assert_eq!(check_trusted(A_USER, &aces, A_USER), Ok(()));
        aces.push(allow(USERS, FULL));
        assert!(matches!(
            check_trusted(A_USER, &aces, A_USER),
            Err(Untrusted::Writable { sid, .. }) if sid == USERS
        ));
    }
}
