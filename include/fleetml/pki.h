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

/* ---- certificate signing requests (provisioning, rotation) -------------- */

/* Why a CSR was refused; codes match the provisioning contract. */
#define FM_CSR_INVALID "invalid_csr"        /* not a parseable PEM PKCS#10 request */
#define FM_CSR_BAD_SIGNATURE "bad_signature" /* the request's self-signature fails */
#define FM_CSR_WEAK_KEY "weak_key"           /* not EC P-256 and not RSA >= 2048 */
#define FM_CSR_CA_NOT_ALLOWED "ca_not_allowed" /* asks for basicConstraints CA:TRUE */

typedef struct fm_csr fm_csr;

/* Parses and checks a PEM CSR (len bytes, not necessarily NUL-terminated;
 * at most 16 KiB): valid self-signature, key EC P-256 or RSA >= 2048, no CA
 * extension requested. On success returns 0 and *out (free with
 * fm_csr_free). On refusal returns FM_EINVAL and copies one of the FM_CSR_*
 * codes into code (>= 32 bytes) and a human message into err. */
int fm_csr_parse(const char *pem, size_t len, fm_csr **out, char *code, fm_errbuf *err);
void fm_csr_free(fm_csr *csr);

/* Issues a certificate for the CSR's public key with subject CN =
 * common_name (the requested subject and extensions are ignored), client or
 * server usage, valid `days`. *cert_pem receives the PEM (free with
 * fm_free); serial_hex (>= 64 bytes) the serial; not_after_ms the expiry.
 * Returns 0 or FM_ECRYPTO / FM_EINVAL with err set. */
int fm_ca_sign_csr(fm_ca *ca, const fm_csr *csr, const char *common_name,
                   enum fm_cert_usage usage, int days, char **cert_pem, char *serial_hex,
                   int64_t *not_after_ms, fm_errbuf *err);

/* 1 when the CSR's public key is the key of the PEM certificate, 0 when
 * not, negative FM_E* when the certificate cannot be read. Lets a device
 * that lost an answer ask again and get the same certificate. */
int fm_csr_matches_cert_pem(const fm_csr *csr, const char *cert_pem);

/* The CSR's key identity: SHA-256 of its DER SubjectPublicKeyInfo as 64
 * lower-case hex digits into hex (>= FM_KEY_ID_LEN + 1 bytes). Returns 0,
 * or FM_EINVAL / FM_ECRYPTO. Used to refuse one key for two devices. */
#define FM_KEY_ID_LEN 64
int fm_csr_key_id(const fm_csr *csr, char *hex, size_t len);

/* The CA certificate as PEM (borrowed, valid while ca lives). */
const char *fm_ca_cert_pem(const fm_ca *ca);

/* A revoked certificate for the CRL. */
typedef struct fm_revoked {
    const char *serial_hex;
    int64_t revoked_ms;
} fm_revoked;

/* Writes an X.509 v2 CRL signed by the CA listing the given serials, valid
 * (nextUpdate) for `days`, to path atomically (0644). Returns 0 or
 * FM_ECRYPTO / FM_EIO / FM_EINVAL (bad serial) with err set. */
int fm_ca_write_crl(fm_ca *ca, const fm_revoked *revoked, size_t n, int days,
                    const char *path, fm_errbuf *err);

/* Serial (lowercase hex, same format as fm_ca_issue_keypair) and subject CN
 * of a PEM certificate held in memory. cn may be NULL. Returns 0,
 * FM_EINVAL or FM_ECRYPTO. */
int fm_cert_pem_info(const char *pem, size_t len, char *serial_hex, size_t serial_len,
                     char *cn, size_t cn_len, int64_t *not_after_ms);

/* ---- device side ---------------------------------------------------------- */

/* Generates a P-256 private key and writes it to key_path (PKCS#8 PEM, mode
 * 0600) unless the file already exists (then it is kept). Returns 0,
 * FM_ECRYPTO or FM_EIO. */
int fm_key_ensure(const char *key_path, fm_errbuf *err);

/* Creates a PEM CSR signed with the key at key_path, subject CN = cn
 * (informational: the CA sets the real CN). *pem is freed with fm_free.
 * Returns 0, FM_ENOTFOUND, FM_ECRYPTO. */
int fm_csr_create(const char *key_path, const char *cn, char **pem, fm_errbuf *err);

#endif
