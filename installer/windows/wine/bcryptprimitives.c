/*
 * A stand-in for Windows' bcryptprimitives.dll, for the Wine check only (scripts/package-msi).
 * Rust's standard library (1.78 and later) draws its random numbers from ProcessPrng in
 * bcryptprimitives.dll, which every supported Windows (10 and later) has but Debian 12's
 * Wine 8.0 lacks, so estafeta.exe cannot even load there. This DLL forwards ProcessPrng to
 * BCryptGenRandom (system RNG), which Wine implements. It is put beside estafeta.exe in the
 * throwaway Wine folder; it is never in the MSI and never on a real Windows.
 */
#include <windows.h>
#include <bcrypt.h>

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!BCRYPT_SUCCESS(BCryptGenRandom(NULL, data, chunk, BCRYPT_USE_SYSTEM_PREFERRED_RNG)))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
