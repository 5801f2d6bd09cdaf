#include "fleetml/core.h"

#include <stdio.h>

const char *fm_strerror(int err)
{
    switch (err) {
    case FM_OK: return "success";
    case FM_EINVAL: return "invalid argument";
    case FM_ENOMEM: return "out of memory";
    case FM_EIO: return "input/output error";
    case FM_ENOTFOUND: return "not found";
    case FM_EEXIST: return "already exists";
    case FM_EPROTO: return "protocol error";
    case FM_ECRYPTO: return "cryptographic operation failed";
    case FM_EDB: return "database error";
    case FM_EBUSY: return "resource busy";
    case FM_ETIMEDOUT: return "timed out";
    case FM_ENOSPC: return "no space left on device";
    case FM_EMODEL: return "model runtime error";
    case FM_ERANGE: return "value out of range";
    case FM_EUNAVAIL: return "service unavailable";
    case FM_ESTATE: return "invalid state";
    case FM_EPERM: return "permission denied";
    default: return "unknown error";
    }
}

int fm_errf(fm_errbuf *err, int code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}
