/*
 * Platform PKI (OpenSSL 3 EVP/X509 APIs only): a root CA with an ECDSA
 * P-256 key, and certificates it issues for the broker (server auth, SANs),
 * the service (client auth) and devices (client auth, CN = device id).
 * Private keys are written PEM, unencrypted, mode 0600.
 */
#ifndef FLEETML_PKI_H
#define FLEETML_PKI_H

#include "fleetml/core.h"

typedef struct fm_ca fm_ca;

/* Creates a new CA (key + self-signed certificate, CN = common_name, valid
 * `days`, 1..36500) and writes key_path (0600) and cert_path (0644). Fails
 * with FM_EEXIST if either file exists (never overwrites; on any failure the
 * files this call created are removed). Other errors: FM_EINVAL, FM_ECRYPTO,
 * FM_EIO, FM_ENOSPC. */
int fm_ca_create(const char *key_path, const char *cert_path, const char *common_name,
                 int days, fm_errbuf *err);

/* Loads a CA from its key and certificate. *out is freed with fm_ca_free
 * and is set to NULL on failure. Returns 0, FM_ENOTFOUND (a file is
 * missing), FM_ECRYPTO (unreadable, mismatched, or not a CA certificate) or
 * FM_ENOMEM, with err. */
int fm_ca_load(const char *key_path, const char *cert_path, fm_ca **out, fm_errbuf *err);
void fm_ca_free(fm_ca *ca);

enum fm_cert_usage { FM_CERT_SERVER = 1, FM_CERT_CLIENT = 2 };

typedef struct fm_cert_req {
    const char *common_name;      /* required */
    const char *const *dns_sans;  /* NULL-terminated list or NULL */
    const char *const *ip_sans;   /* NULL-terminated list or NULL */
    enum fm_cert_usage usage;
    int days;
} fm_cert_req;

/* Generates a fresh P-256 key, issues a certificate for it signed by ca and
 * writes key_path (0600) and cert_path (0644) atomically, replacing existing
 * files. If serial_hex is non-NULL it receives the certificate serial as
 * lowercase hex (>= 41 bytes). Returns 0, FM_EINVAL (empty CN, bad days,
 * usage or SAN), FM_ECRYPTO (including a CN over 64 characters), FM_EIO or
 * FM_ENOSPC, with err set. */
int fm_ca_issue_keypair(fm_ca *ca, const fm_cert_req *req, const char *key_path,
                        const char *cert_path, char *serial_hex, fm_errbuf *err);

/* Reads the subject CN of the PEM certificate at path into cn (size
 * cn_len). Returns 0, FM_ENOTFOUND, FM_ECRYPTO (unparsable, no CN or more
 * than one), FM_EINVAL (CN does not fit cn_len). */
int fm_cert_file_cn(const char *path, char *cn, size_t cn_len, fm_errbuf *err);

/* Verifies that the PEM certificate at cert_path chains to the CA
 * certificate at ca_path. Returns 0, FM_ENOTFOUND (a file is missing) or
 * FM_ECRYPTO with the reason. */
int fm_cert_verify_file(const char *ca_path, const char *cert_path, fm_errbuf *err);

#endif
