/*
 * Platform PKI on OpenSSL 3 EVP/X509 APIs.
 *
 * Every key is ECDSA P-256 and every signature SHA-256: P-256 is what
 * constrained device TLS stacks (mbedTLS, wolfSSL, ESP-IDF) support best,
 * and one algorithm keeps the broker's cipher configuration simple.
 *
 * The CA is a single self-signed root with pathlen:0, so it can only sign
 * leaf certificates; there is no intermediate because the platform is
 * self-hosted and the CA key lives next to the service that issues device
 * certificates anyway.
 */
#include "fleetml/pki.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

struct fm_ca {
    EVP_PKEY *key;
    X509 *cert;
    char *cert_pem; /* cert re-encoded as PEM, handed out by fm_ca_cert_pem */
};

/* A request that passed fm_csr_parse's checks. Only its public key is ever
 * used: the requested subject and extensions are ignored when signing. */
struct fm_csr {
    X509_REQ *req;
};

/* Certificates are backdated so that a device whose clock is a little
 * behind the server's still accepts a certificate issued a moment ago. */
#define PKI_BACKDATE_SECONDS (5L * 60L)
/* Upper bound for validity so that `days * 86400` cannot overflow and a
 * typo ("36500" vs "3650") is still caught at some point. */
#define PKI_MAX_DAYS 36500
/* RFC 5280 allows at most 20 octets of serial; clearing the top bit keeps
 * the DER INTEGER positive without a leading zero octet (159 random bits). */
#define PKI_SERIAL_BYTES 20
/* A P-256 or RSA-4096 request is well under 4 KiB of PEM; the bound keeps a
 * hostile client from making the service parse megabytes of ASN.1. */
#define PKI_CSR_MAX_BYTES (16 * 1024)
/* Certificates handed to fm_cert_pem_info come from this CA or from the
 * database; a chain of a few certificates still fits easily. */
#define PKI_CERT_MAX_BYTES (64 * 1024)
/* Serials are hex strings of at most 20 octets when RFC 5280 is followed;
 * some foreign CAs exceed it, so a little slack is allowed for the CRL. */
#define PKI_SERIAL_HEX_MAX 64

/* Drains the OpenSSL error queue into err, prefixed with what failed, and
 * returns FM_ECRYPTO. The most recent error is the most specific one, so it
 * is the one kept; the rest of the queue is discarded so that it does not
 * leak into the next, unrelated failure report. */
static int crypto_err(fm_errbuf *err, const char *what)
{
    unsigned long e, last = 0;
    while ((e = ERR_get_error()) != 0)
        last = e;
    if (last == 0)
        return fm_errf(err, FM_ECRYPTO, "%s failed", what);
    char buf[256];
    ERR_error_string_n(last, buf, sizeof buf);
    return fm_errf(err, FM_ECRYPTO, "%s: %s", what, buf);
}

static EVP_PKEY *gen_p256(void)
{
    return EVP_EC_gen("P-256");
}

/* Reads a whole PEM file into a memory BIO. Missing files are reported as
 * FM_ENOTFOUND so that callers can tell "not initialised yet" from
 * "corrupt". The file buffer is wiped because it may hold a private key. */
static int read_pem_bio(const char *path, BIO **out, fm_errbuf *err)
{
    char *data = NULL;
    size_t len = 0;
    int rc = fm_read_file(path, &data, &len);
    if (rc == FM_ENOTFOUND)
        return fm_errf(err, rc, "%s: no such file", path);
    if (rc != 0)
        return fm_errf(err, rc, "%s: %s", path, fm_strerror(rc));
    /* A secure-memory BIO clears its buffer when freed (key material). */
    BIO *bio = BIO_new(BIO_s_secmem());
    if (!bio || BIO_write(bio, data, (int)len) != (int)len) {
        BIO_free(bio);
        OPENSSL_cleanse(data, len);
        fm_free(data);
        return crypto_err(err, "BIO_write");
    }
    OPENSSL_cleanse(data, len);
    fm_free(data);
    *out = bio;
    return 0;
}

/* Every PEM reader gets this callback instead of NULL. With NULL, OpenSSL
 * prompts on the controlling terminal for the passphrase of a block marked
 * "Proc-Type: 4,ENCRYPTED"; a CSR received from the network must never be
 * able to block the service on a tty read. Encrypted PEM is refused. */
static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return -1;
}

static int load_cert(const char *path, X509 **out, fm_errbuf *err)
{
    BIO *bio = NULL;
    int rc = read_pem_bio(path, &bio, err);
    if (rc != 0)
        return rc;
    X509 *cert = PEM_read_bio_X509(bio, NULL, no_passphrase, NULL);
    BIO_free(bio);
    if (!cert) {
        char what[300];
        snprintf(what, sizeof what, "%s: reading PEM certificate", path);
        return crypto_err(err, what);
    }
    *out = cert;
    return 0;
}

/* Loads an unencrypted PEM private key (PKCS#8 or traditional). */
static int load_key(const char *path, EVP_PKEY **out, fm_errbuf *err)
{
    BIO *bio = NULL;
    int rc = read_pem_bio(path, &bio, err);
    if (rc != 0)
        return rc;
    EVP_PKEY *key = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL);
    BIO_free(bio);
    if (!key) {
        char what[300];
        snprintf(what, sizeof what, "%s: reading private key", path);
        return crypto_err(err, what);
    }
    *out = key;
    return 0;
}

/* One object to serialise as PEM: exactly one member is non-NULL. Keys are
 * written as unencrypted PKCS#8. */
typedef struct pem_obj {
    EVP_PKEY *key;
    X509 *cert;
    X509_REQ *req;
    X509_CRL *crl;
} pem_obj;

/* Serialises o into a new memory BIO (a secure-memory one for keys, which
 * is wiped when freed). */
static int pem_encode(const pem_obj *o, BIO **out, fm_errbuf *err)
{
    BIO *bio = BIO_new(o->key ? BIO_s_secmem() : BIO_s_mem());
    if (!bio)
        return crypto_err(err, "BIO_new");
    int ok;
    const char *what;
    if (o->key) {
        ok = PEM_write_bio_PKCS8PrivateKey(bio, o->key, NULL, NULL, 0, NULL, NULL);
        what = "PEM_write_bio_PKCS8PrivateKey";
    } else if (o->cert) {
        ok = PEM_write_bio_X509(bio, o->cert);
        what = "PEM_write_bio_X509";
    } else if (o->req) {
        ok = PEM_write_bio_X509_REQ(bio, o->req);
        what = "PEM_write_bio_X509_REQ";
    } else {
        ok = o->crl && PEM_write_bio_X509_CRL(bio, o->crl);
        what = "PEM_write_bio_X509_CRL";
    }
    if (!ok) {
        BIO_free(bio);
        return crypto_err(err, what);
    }
    *out = bio;
    return 0;
}

/* Serialises o to PEM and writes it atomically with the given mode. */
static int write_pem(const char *path, const pem_obj *o, unsigned mode, fm_errbuf *err)
{
    BIO *bio = NULL;
    int rc = pem_encode(o, &bio, err);
    if (rc != 0)
        return rc;
    char *data = NULL;
    long len = BIO_get_mem_data(bio, &data);
    rc = fm_write_file_atomic(path, data, (size_t)len, mode);
    BIO_free(bio);
    if (rc != 0)
        return fm_errf(err, rc, "writing %s: %s", path, fm_strerror(rc));
    return 0;
}

/* Serialises o (never a key) to a NUL-terminated PEM string the caller
 * frees with fm_free. */
static int pem_string(const pem_obj *o, char **out, fm_errbuf *err)
{
    BIO *bio = NULL;
    int rc = pem_encode(o, &bio, err);
    if (rc != 0)
        return rc;
    char *data = NULL;
    long len = BIO_get_mem_data(bio, &data);
    char *s = len >= 0 ? fm_malloc((size_t)len + 1) : NULL;
    if (!s) {
        BIO_free(bio);
        return fm_errf(err, FM_ENOMEM, "out of memory");
    }
    if (len > 0)
        memcpy(s, data, (size_t)len);
    s[len] = '\0';
    BIO_free(bio);
    *out = s;
    return 0;
}

/* Formats bn as lowercase hex exactly as BN_bn2hex prints it (so a leading
 * zero nibble of the first octet is kept): the one serial format used in
 * the database, the broker registry and the CRL code. */
static int bn_hex_lower(const BIGNUM *bn, char *out, size_t out_len, fm_errbuf *err)
{
    char *hex = BN_bn2hex(bn);
    if (!hex)
        return crypto_err(err, "BN_bn2hex");
    size_t n = strlen(hex);
    if (n >= out_len) {
        OPENSSL_free(hex);
        return fm_errf(err, FM_EINVAL, "serial (%zu hex digits) does not fit the buffer", n);
    }
    for (size_t i = 0; i <= n; i++)
        out[i] = (char)(hex[i] >= 'A' && hex[i] <= 'F' ? hex[i] - 'A' + 'a' : hex[i]);
    OPENSSL_free(hex);
    return 0;
}

/* The serial of cert in the format of bn_hex_lower. */
static int cert_serial_hex(const X509 *cert, char *out, size_t out_len, fm_errbuf *err)
{
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), NULL);
    if (!bn)
        return crypto_err(err, "ASN1_INTEGER_to_BN");
    int rc = bn_hex_lower(bn, out, out_len, err);
    BN_free(bn);
    return rc;
}

/* Converts an ASN1_TIME to milliseconds since the epoch. */
static int asn1_time_ms(const ASN1_TIME *t, int64_t *ms, fm_errbuf *err)
{
    struct tm tm;
    memset(&tm, 0, sizeof tm);
    if (!ASN1_TIME_to_tm(t, &tm))
        return crypto_err(err, "ASN1_TIME_to_tm");
    time_t secs = timegm(&tm);
    if (secs == (time_t)-1)
        return fm_errf(err, FM_ECRYPTO, "certificate time out of range");
    *ms = (int64_t)secs * 1000;
    return 0;
}

/* Assigns a fresh random positive serial and optionally returns it as
 * lowercase hex. Random serials (rather than a counter) mean no state has to
 * be kept next to the CA and serials never collide across re-installs. */
static int set_random_serial(X509 *cert, char *hex_out, fm_errbuf *err)
{
    unsigned char raw[PKI_SERIAL_BYTES];
    BIGNUM *bn = NULL;
    ASN1_INTEGER *ai = NULL;
    int rc = FM_ECRYPTO;

    /* Zero is not a valid serial; with 159 random bits this loop runs once
     * in practice, it only exists to make the invariant unconditional. */
    do {
        if (RAND_bytes(raw, sizeof raw) != 1)
            return crypto_err(err, "RAND_bytes");
        raw[0] &= 0x7f;
        BN_free(bn);
        bn = BN_bin2bn(raw, sizeof raw, NULL);
        if (!bn)
            return crypto_err(err, "BN_bin2bn");
    } while (BN_is_zero(bn));

    ai = BN_to_ASN1_INTEGER(bn, NULL);
    if (!ai || !X509_set_serialNumber(cert, ai)) {
        rc = crypto_err(err, "setting serial number");
        goto out;
    }
    /* At most 40 hex digits for 159 bits, so the documented 41 bytes fit. */
    rc = hex_out ? bn_hex_lower(bn, hex_out, 2 * PKI_SERIAL_BYTES + 1, err) : 0;
out:
    ASN1_INTEGER_free(ai);
    BN_free(bn);
    return rc;
}

/* Adds one extension given in OpenSSL's config syntax. Only called with
 * constant values from this file, never with user input, so the config
 * parser cannot be abused to inject extra extension content. */
static int add_ext_to(X509 *cert, X509_CRL *crl, X509 *issuer, int nid, const char *value,
                      fm_errbuf *err)
{
    X509V3_CTX ctx;
    X509V3_set_ctx(&ctx, issuer, cert, NULL, crl, 0);
    X509_EXTENSION *ext = X509V3_EXT_nconf_nid(NULL, &ctx, nid, value);
    if (!ext || !(cert ? X509_add_ext(cert, ext, -1) : X509_CRL_add_ext(crl, ext, -1))) {
        X509_EXTENSION_free(ext);
        char what[128];
        snprintf(what, sizeof what, "adding extension %s", OBJ_nid2sn(nid));
        return crypto_err(err, what);
    }
    X509_EXTENSION_free(ext);
    return 0;
}

static int add_ext(X509 *cert, X509 *issuer, int nid, const char *value, fm_errbuf *err)
{
    return add_ext_to(cert, NULL, issuer, nid, value, err);
}

/* DNS SANs are restricted to LDH labels (plus a leading "*." wildcard) so
 * that a name cannot smuggle in anything a TLS client would misinterpret. */
static int valid_dns_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 253)
        return 0;
    if (s[0] == '*') {
        if (s[1] != '.' || s[2] == '\0')
            return 0;
        s += 2;
    }
    size_t label = 0;
    for (const char *p = s; *p; p++) {
        char c = *p;
        if (c == '.') {
            if (label == 0)
                return 0;
            label = 0;
            continue;
        }
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-'))
            return 0;
        if (++label > 63)
            return 0;
    }
    return label > 0;
}

/* Builds subjectAltName from the request's lists directly as GENERAL_NAMEs
 * rather than through the config-string parser: the names come from users,
 * and a comma in a name must not turn into a second SAN. */
static int add_sans(X509 *cert, const fm_cert_req *req, fm_errbuf *err)
{
    GENERAL_NAMES *gens = sk_GENERAL_NAME_new_null();
    int rc = 0;
    if (!gens)
        return crypto_err(err, "sk_GENERAL_NAME_new_null");

    for (const char *const *d = req->dns_sans; d && *d; d++) {
        if (!valid_dns_name(*d)) {
            rc = fm_errf(err, FM_EINVAL, "invalid DNS subjectAltName \"%.200s\"", *d);
            goto out;
        }
        GENERAL_NAME *gn = GENERAL_NAME_new();
        ASN1_IA5STRING *ia5 = ASN1_IA5STRING_new();
        if (!gn || !ia5 || !ASN1_STRING_set(ia5, *d, -1)) {
            GENERAL_NAME_free(gn);
            ASN1_IA5STRING_free(ia5);
            rc = crypto_err(err, "building DNS subjectAltName");
            goto out;
        }
        GENERAL_NAME_set0_value(gn, GEN_DNS, ia5);
        if (!sk_GENERAL_NAME_push(gens, gn)) {
            GENERAL_NAME_free(gn);
            rc = crypto_err(err, "sk_GENERAL_NAME_push");
            goto out;
        }
    }
    for (const char *const *ip = req->ip_sans; ip && *ip; ip++) {
        ASN1_OCTET_STRING *addr = a2i_IPADDRESS(*ip);
        if (!addr) {
            ERR_clear_error();
            rc = fm_errf(err, FM_EINVAL, "invalid IP subjectAltName \"%.200s\"", *ip);
            goto out;
        }
        GENERAL_NAME *gn = GENERAL_NAME_new();
        if (!gn) {
            ASN1_OCTET_STRING_free(addr);
            rc = crypto_err(err, "GENERAL_NAME_new");
            goto out;
        }
        GENERAL_NAME_set0_value(gn, GEN_IPADD, addr);
        if (!sk_GENERAL_NAME_push(gens, gn)) {
            GENERAL_NAME_free(gn);
            rc = crypto_err(err, "sk_GENERAL_NAME_push");
            goto out;
        }
    }
    if (sk_GENERAL_NAME_num(gens) > 0 &&
        !X509_add1_ext_i2d(cert, NID_subject_alt_name, gens, 0, X509V3_ADD_DEFAULT))
        rc = crypto_err(err, "adding subjectAltName");
out:
    GENERAL_NAMES_free(gens);
    return rc;
}

/* Fills the fields common to CA and leaf certificates: version, serial,
 * subject CN, issuer, validity and public key. */
static int init_cert(X509 *cert, X509 *issuer, EVP_PKEY *pub, const char *cn, int days,
                     char *serial_hex, fm_errbuf *err)
{
    if (!X509_set_version(cert, X509_VERSION_3))
        return crypto_err(err, "X509_set_version");
    int rc = set_random_serial(cert, serial_hex, err);
    if (rc != 0)
        return rc;

    X509_NAME *name = X509_get_subject_name(cert);
    /* MBSTRING_UTF8 makes OpenSSL pick the narrowest string type and enforce
     * the RFC 5280 upper bound of 64 characters for a CN. */
    if (!X509_NAME_add_entry_by_NID(name, NID_commonName, MBSTRING_UTF8,
                                    (const unsigned char *)cn, -1, -1, 0))
        return crypto_err(err, "setting subject CN");
    X509_NAME *issuer_name = issuer ? X509_get_subject_name(issuer) : name;
    if (!X509_set_issuer_name(cert, issuer_name))
        return crypto_err(err, "X509_set_issuer_name");

    if (!X509_gmtime_adj(X509_getm_notBefore(cert), -PKI_BACKDATE_SECONDS) ||
        !X509_time_adj_ex(X509_getm_notAfter(cert), days, 0, NULL))
        return crypto_err(err, "setting validity");
    if (!X509_set_pubkey(cert, pub))
        return crypto_err(err, "X509_set_pubkey");
    return 0;
}

static int check_common_args(const char *cn, int days, fm_errbuf *err)
{
    if (!cn || !*cn)
        return fm_errf(err, FM_EINVAL, "common name is required");
    if (days <= 0 || days > PKI_MAX_DAYS)
        return fm_errf(err, FM_EINVAL, "validity must be 1..%d days, got %d", PKI_MAX_DAYS,
                       days);
    return 0;
}

/* Builds and signs a leaf certificate for the public key pub. Shared by
 * fm_ca_issue_keypair and fm_ca_sign_csr, so that a certificate issued from
 * a device's CSR is indistinguishable from one issued with a key generated
 * here. *out is freed by the caller with X509_free. */
static int issue_leaf(fm_ca *ca, EVP_PKEY *pub, const fm_cert_req *req, char *serial_hex,
                      X509 **out, fm_errbuf *err)
{
    int rc = check_common_args(req->common_name, req->days, err);
    if (rc != 0)
        return rc;
    const char *eku;
    switch (req->usage) {
    case FM_CERT_SERVER: eku = "serverAuth"; break;
    case FM_CERT_CLIENT: eku = "clientAuth"; break;
    default: return fm_errf(err, FM_EINVAL, "unknown certificate usage %d", (int)req->usage);
    }

    X509 *cert = X509_new();
    if (!cert)
        return crypto_err(err, "X509_new");
    rc = init_cert(cert, ca->cert, pub, req->common_name, req->days, serial_hex, err);
    if (rc != 0)
        goto out;
    /* keyAgreement is included because ECDH_ECDSA-style TLS stacks on some
     * devices check it; digitalSignature is what TLS 1.2/1.3 ECDHE uses. */
    if ((rc = add_ext(cert, ca->cert, NID_basic_constraints, "critical,CA:FALSE", err)) ||
        (rc = add_ext(cert, ca->cert, NID_key_usage, "critical,digitalSignature,keyAgreement",
                      err)) ||
        (rc = add_ext(cert, ca->cert, NID_ext_key_usage, eku, err)) ||
        (rc = add_ext(cert, ca->cert, NID_subject_key_identifier, "hash", err)) ||
        (rc = add_ext(cert, ca->cert, NID_authority_key_identifier, "keyid:always", err)) ||
        (rc = add_sans(cert, req, err)))
        goto out;
    if (!X509_sign(cert, ca->key, EVP_sha256())) {
        rc = crypto_err(err, "signing certificate");
        goto out;
    }
    *out = cert;
    cert = NULL;
    rc = 0;
out:
    X509_free(cert);
    return rc;
}

/* Creates path empty with O_EXCL as a reservation. fm_write_file_atomic
 * later renames the real content over it, so two processes initialising the
 * same CA directory cannot both succeed and silently replace each other's
 * key (a plain stat-then-write check would allow that race). */
static int reserve_file(const char *path, fm_errbuf *err)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        if (errno == EEXIST)
            return fm_errf(err, FM_EEXIST, "%s already exists, refusing to overwrite", path);
        return fm_errf(err, FM_EIO, "creating %s: %s", path, strerror(errno));
    }
    close(fd);
    return 0;
}

int fm_ca_create(const char *key_path, const char *cert_path, const char *common_name,
                 int days, fm_errbuf *err)
{
    EVP_PKEY *key = NULL;
    X509 *cert = NULL;
    int key_reserved = 0, cert_reserved = 0;
    int rc;

    if (!key_path || !cert_path)
        return fm_errf(err, FM_EINVAL, "key and certificate paths are required");
    rc = check_common_args(common_name, days, err);
    if (rc != 0)
        return rc;
    ERR_clear_error();

    rc = reserve_file(key_path, err);
    if (rc != 0)
        goto out;
    key_reserved = 1;
    rc = reserve_file(cert_path, err);
    if (rc != 0)
        goto out;
    cert_reserved = 1;

    key = gen_p256();
    if (!key) {
        rc = crypto_err(err, "generating P-256 key");
        goto out;
    }
    cert = X509_new();
    if (!cert) {
        rc = crypto_err(err, "X509_new");
        goto out;
    }
    rc = init_cert(cert, NULL, key, common_name, days, NULL, err);
    if (rc != 0)
        goto out;

    /* The subject key identifier must exist before the authority key
     * identifier, which for a self-signed certificate is copied from it. */
    if ((rc = add_ext(cert, cert, NID_basic_constraints, "critical,CA:TRUE,pathlen:0", err)) ||
        (rc = add_ext(cert, cert, NID_key_usage, "critical,keyCertSign,cRLSign", err)) ||
        (rc = add_ext(cert, cert, NID_subject_key_identifier, "hash", err)) ||
        (rc = add_ext(cert, cert, NID_authority_key_identifier, "keyid:always", err)))
        goto out;

    if (!X509_sign(cert, key, EVP_sha256())) {
        rc = crypto_err(err, "signing CA certificate");
        goto out;
    }
    /* Key first: a certificate without its key is useless, while a key
     * without a certificate is cleaned up below on failure anyway. */
    if ((rc = write_pem(key_path, &(pem_obj){.key = key}, 0600, err)) ||
        (rc = write_pem(cert_path, &(pem_obj){.cert = cert}, 0644, err)))
        goto out;
    fm_logf(FM_LOG_INFO, "pki", "created CA \"%s\" (%s)", common_name, cert_path);
    rc = 0;
out:
    /* Only files this call created are removed, never pre-existing ones. */
    if (rc != 0) {
        if (key_reserved)
            unlink(key_path);
        if (cert_reserved)
            unlink(cert_path);
    }
    X509_free(cert);
    EVP_PKEY_free(key);
    return rc;
}

int fm_ca_load(const char *key_path, const char *cert_path, fm_ca **out, fm_errbuf *err)
{
    EVP_PKEY *key = NULL;
    X509 *cert = NULL;
    char *pem = NULL;
    fm_ca *ca = NULL;
    int rc;

    if (!key_path || !cert_path || !out)
        return fm_errf(err, FM_EINVAL, "key path, certificate path and out are required");
    *out = NULL;
    ERR_clear_error();

    rc = load_cert(cert_path, &cert, err);
    if (rc != 0)
        goto out;
    rc = load_key(key_path, &key, err);
    if (rc != 0)
        goto out;
    if (X509_check_private_key(cert, key) != 1) {
        rc = crypto_err(err, "CA key does not match CA certificate");
        goto out;
    }
    /* Refuse a leaf certificate placed where the CA belongs: everything it
     * signed would fail verification much later and far less clearly. */
    if (X509_check_ca(cert) == 0) {
        rc = fm_errf(err, FM_ECRYPTO, "%s is not a CA certificate", cert_path);
        goto out;
    }
    /* Re-encoded rather than copied from the file, so that only the
     * certificate is handed out even if the file has comments around it. */
    rc = pem_string(&(pem_obj){.cert = cert}, &pem, err);
    if (rc != 0)
        goto out;
    ca = fm_malloc(sizeof *ca);
    if (!ca) {
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
        goto out;
    }
    ca->key = key;
    ca->cert = cert;
    ca->cert_pem = pem;
    key = NULL;
    cert = NULL;
    pem = NULL;
    *out = ca;
    rc = 0;
out:
    fm_free(pem);
    EVP_PKEY_free(key);
    X509_free(cert);
    return rc;
}

void fm_ca_free(fm_ca *ca)
{
    if (!ca)
        return;
    EVP_PKEY_free(ca->key);
    X509_free(ca->cert);
    fm_free(ca->cert_pem);
    fm_free(ca);
}

const char *fm_ca_cert_pem(const fm_ca *ca)
{
    return ca ? ca->cert_pem : NULL;
}

int fm_ca_issue_keypair(fm_ca *ca, const fm_cert_req *req, const char *key_path,
                        const char *cert_path, char *serial_hex, fm_errbuf *err)
{
    EVP_PKEY *key = NULL;
    X509 *cert = NULL;
    int rc;

    if (!ca || !req || !key_path || !cert_path)
        return fm_errf(err, FM_EINVAL, "CA, request and paths are required");
    /* Checked before generating a key only to fail fast; issue_leaf checks
     * again because it is the function that relies on them. */
    rc = check_common_args(req->common_name, req->days, err);
    if (rc != 0)
        return rc;
    ERR_clear_error();

    key = gen_p256();
    if (!key) {
        rc = crypto_err(err, "generating P-256 key");
        goto out;
    }
    if ((rc = issue_leaf(ca, key, req, serial_hex, &cert, err)) ||
        (rc = write_pem(key_path, &(pem_obj){.key = key}, 0600, err)) ||
        (rc = write_pem(cert_path, &(pem_obj){.cert = cert}, 0644, err)))
        goto out;
    rc = 0;
out:
    X509_free(cert);
    EVP_PKEY_free(key);
    return rc;
}

/* Copies the single subject CN of cert (UTF-8) into cn. `what` names the
 * certificate in messages. */
static int cert_cn(const X509 *cert, const char *what, char *cn, size_t cn_len, fm_errbuf *err)
{
    unsigned char *utf8 = NULL;
    int rc;
    const X509_NAME *name = X509_get_subject_name(cert);
    int idx = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
    /* A subject with two CNs is ambiguous (different consumers pick
     * different ones), so it is treated like one without a CN. */
    if (idx < 0 || X509_NAME_get_index_by_NID(name, NID_commonName, idx) >= 0)
        return fm_errf(err, FM_ECRYPTO, "%s: subject has no single common name", what);
    ASN1_STRING *data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, idx));
    int n = ASN1_STRING_to_UTF8(&utf8, data);
    if (n < 0)
        return crypto_err(err, "decoding common name");
    if (memchr(utf8, '\0', (size_t)n)) {
        rc = fm_errf(err, FM_ECRYPTO, "%s: common name contains a NUL byte", what);
        goto out;
    }
    if ((size_t)n >= cn_len) {
        rc = fm_errf(err, FM_EINVAL, "common name (%d bytes) does not fit the buffer", n);
        goto out;
    }
    memcpy(cn, utf8, (size_t)n);
    cn[n] = '\0';
    rc = 0;
out:
    OPENSSL_free(utf8);
    return rc;
}

int fm_cert_file_cn(const char *path, char *cn, size_t cn_len, fm_errbuf *err)
{
    X509 *cert = NULL;
    if (!path || !cn || cn_len == 0)
        return fm_errf(err, FM_EINVAL, "path and a non-empty buffer are required");
    ERR_clear_error();
    int rc = load_cert(path, &cert, err);
    if (rc != 0)
        return rc;
    rc = cert_cn(cert, path, cn, cn_len, err);
    X509_free(cert);
    return rc;
}

int fm_cert_verify_file(const char *ca_path, const char *cert_path, fm_errbuf *err)
{
    X509 *ca = NULL, *cert = NULL;
    X509_STORE *store = NULL;
    X509_STORE_CTX *ctx = NULL;
    int rc;

    if (!ca_path || !cert_path)
        return fm_errf(err, FM_EINVAL, "CA and certificate paths are required");
    ERR_clear_error();
    if ((rc = load_cert(ca_path, &ca, err)) || (rc = load_cert(cert_path, &cert, err)))
        goto out;

    store = X509_STORE_new();
    ctx = X509_STORE_CTX_new();
    if (!store || !ctx) {
        rc = crypto_err(err, "allocating X509 store");
        goto out;
    }
    if (!X509_STORE_add_cert(store, ca)) {
        rc = crypto_err(err, "X509_STORE_add_cert");
        goto out;
    }
    if (!X509_STORE_CTX_init(ctx, store, cert, NULL)) {
        rc = crypto_err(err, "X509_STORE_CTX_init");
        goto out;
    }
    if (X509_verify_cert(ctx) != 1) {
        int verr = X509_STORE_CTX_get_error(ctx);
        ERR_clear_error();
        rc = fm_errf(err, FM_ECRYPTO, "%s: verification failed: %s", cert_path,
                     X509_verify_cert_error_string(verr));
        goto out;
    }
    rc = 0;
out:
    X509_STORE_CTX_free(ctx);
    X509_STORE_free(store);
    X509_free(cert);
    X509_free(ca);
    return rc;
}

/* ---- certificate signing requests ----------------------------------------- */

/* Records why a CSR was refused: the contract code into code (if given)
 * and a human message into err. Returns FM_EINVAL, the refusal error. */
static int csr_refuse(char *code, const char *why, fm_errbuf *err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int csr_refuse(char *code, const char *why, fm_errbuf *err, const char *fmt, ...)
{
    if (code)
        memcpy(code, why, strlen(why) + 1);
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    ERR_clear_error();
    return FM_EINVAL;
}

/* Accepts exactly EC P-256 with a named curve and RSA (rsaEncryption) of at
 * least 2048 bits. This is an allowlist: everything else (other curves,
 * Ed25519, DSA, RSA-PSS-only keys) is refused, because every certificate
 * must work with the broker's TLS configuration and with the constrained
 * TLS stacks on devices that verify their peers. */
static int check_csr_key(EVP_PKEY *pub, char *code, fm_errbuf *err)
{
    int id = EVP_PKEY_get_base_id(pub);
    if (id == EVP_PKEY_RSA) {
        int bits = EVP_PKEY_get_bits(pub);
        if (bits < 2048)
            return csr_refuse(code, FM_CSR_WEAK_KEY, err,
                              "RSA key of %d bits is too weak (2048 bits at least)", bits);
        return 0;
    }
    if (id != EVP_PKEY_EC) {
        const char *name = OBJ_nid2sn(id);
        return csr_refuse(code, FM_CSR_WEAK_KEY, err,
                          "key type %s is not accepted (EC P-256 or RSA >= 2048 only)",
                          name && id != NID_undef ? name : "unknown");
    }
    char group[64] = "", encoding[32] = "";
    if (!EVP_PKEY_get_utf8_string_param(pub, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group,
                                        NULL))
        return csr_refuse(code, FM_CSR_WEAK_KEY, err, "EC key without a named curve");
    int nid = OBJ_txt2nid(group);
    if (nid == NID_undef)
        nid = EC_curve_nist2nid(group);
    if (nid != NID_X9_62_prime256v1)
        return csr_refuse(code, FM_CSR_WEAK_KEY, err,
                          "EC curve %s is not accepted (P-256 only)", group);
    /* OpenSSL maps explicit curve parameters that happen to equal P-256 to
     * the named curve, but remembers the encoding. Explicit parameters are
     * refused: certificates must name the curve, and validating arbitrary
     * parameters has been a source of vulnerabilities in TLS stacks. */
    if (EVP_PKEY_get_utf8_string_param(pub, OSSL_PKEY_PARAM_EC_ENCODING, encoding,
                                       sizeof encoding, NULL) &&
        strcmp(encoding, OSSL_PKEY_EC_ENCODING_GROUP) != 0)
        return csr_refuse(code, FM_CSR_WEAK_KEY, err,
                          "EC key with explicit curve parameters is not accepted");
    return 0;
}

/* Refuses a request that asks for basicConstraints CA:TRUE. Requested
 * extensions are never copied into the certificate, so this is not what
 * keeps a device from becoming a CA; it makes such a request fail loudly
 * instead of silently producing a leaf certificate. */
static int check_csr_extensions(X509_REQ *req, char *code, fm_errbuf *err)
{
    STACK_OF(X509_EXTENSION) *exts = X509_REQ_get_extensions(req);
    int rc = 0;
    if (!exts) {
        /* OpenSSL returns NULL both for "no extensions" (older 3.0
         * releases) and for a malformed extension request. */
        if (X509_REQ_get_attr_by_NID(req, NID_ext_req, -1) >= 0 ||
            X509_REQ_get_attr_by_NID(req, NID_ms_ext_req, -1) >= 0)
            return csr_refuse(code, FM_CSR_INVALID, err,
                              "the request's extension attribute is malformed");
        ERR_clear_error();
        return 0;
    }
    for (int i = 0; i < sk_X509_EXTENSION_num(exts) && rc == 0; i++) {
        X509_EXTENSION *ext = sk_X509_EXTENSION_value(exts, i);
        if (OBJ_obj2nid(X509_EXTENSION_get_object(ext)) != NID_basic_constraints)
            continue;
        BASIC_CONSTRAINTS *bc = X509V3_EXT_d2i(ext);
        if (!bc)
            rc = csr_refuse(code, FM_CSR_INVALID, err,
                            "the requested basicConstraints extension is malformed");
        else if (bc->ca)
            rc = csr_refuse(code, FM_CSR_CA_NOT_ALLOWED, err,
                            "the request asks for a CA certificate (basicConstraints CA:TRUE)");
        BASIC_CONSTRAINTS_free(bc);
    }
    sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
    return rc;
}

int fm_csr_parse(const char *pem, size_t len, fm_csr **out, char *code, fm_errbuf *err)
{
    BIO *bio = NULL;
    X509_REQ *req = NULL;
    int rc;

    if (code)
        code[0] = '\0';
    if (!out)
        return fm_errf(err, FM_EINVAL, "out is required");
    *out = NULL;
    if (!pem || len == 0)
        return csr_refuse(code, FM_CSR_INVALID, err, "the certificate request is empty");
    if (len > PKI_CSR_MAX_BYTES)
        return csr_refuse(code, FM_CSR_INVALID, err,
                          "the certificate request is too large (%zu bytes, at most %d)", len,
                          PKI_CSR_MAX_BYTES);
    ERR_clear_error();

    bio = BIO_new_mem_buf(pem, (int)len);
    if (!bio) {
        rc = crypto_err(err, "BIO_new_mem_buf");
        goto fail;
    }
    req = PEM_read_bio_X509_REQ(bio, NULL, no_passphrase, NULL);
    if (!req) {
        rc = csr_refuse(code, FM_CSR_INVALID, err,
                        "not a PEM PKCS#10 certificate request");
        goto out;
    }
    /* Anything but whitespace after the block is refused, so that one
     * message cannot carry a second request that another parser (or a
     * human reading logs) might take for the real one. */
    char *rest = NULL;
    long rest_len = BIO_get_mem_data(bio, &rest);
    for (long i = 0; i < rest_len; i++) {
        if (!strchr(" \t\r\n", rest[i]) || rest[i] == '\0') {
            rc = csr_refuse(code, FM_CSR_INVALID, err,
                            "unexpected data after the certificate request");
            goto out;
        }
    }

    EVP_PKEY *pub = X509_REQ_get0_pubkey(req);
    if (!pub) {
        rc = csr_refuse(code, FM_CSR_INVALID, err,
                        "the request's public key cannot be decoded");
        goto out;
    }
    /* The key type is checked before the signature so that no signature
     * algorithm outside the allowlist is ever run on untrusted input. */
    if ((rc = check_csr_key(pub, code, err)) != 0)
        goto out;
    if (X509_REQ_verify(req, pub) != 1) {
        rc = csr_refuse(code, FM_CSR_BAD_SIGNATURE, err,
                        "the request's signature does not verify with its public key");
        goto out;
    }
    if ((rc = check_csr_extensions(req, code, err)) != 0)
        goto out;

    fm_csr *csr = fm_malloc(sizeof *csr);
    if (!csr) {
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
        goto fail;
    }
    csr->req = req;
    req = NULL;
    *out = csr;
    rc = 0;
    goto out;
fail:
    /* Not the request's fault: report the contract's catch-all code. */
    if (code)
        memcpy(code, "internal", sizeof "internal");
out:
    X509_REQ_free(req);
    BIO_free(bio);
    return rc;
}

void fm_csr_free(fm_csr *csr)
{
    if (!csr)
        return;
    X509_REQ_free(csr->req);
    fm_free(csr);
}

int fm_ca_sign_csr(fm_ca *ca, const fm_csr *csr, const char *common_name,
                   enum fm_cert_usage usage, int days, char **cert_pem, char *serial_hex,
                   int64_t *not_after_ms, fm_errbuf *err)
{
    X509 *cert = NULL;
    char *pem = NULL;
    int64_t not_after = 0;
    int rc;

    if (!ca || !csr || !cert_pem)
        return fm_errf(err, FM_EINVAL, "CA, request and cert_pem are required");
    *cert_pem = NULL;
    ERR_clear_error();
    EVP_PKEY *pub = X509_REQ_get0_pubkey(csr->req);
    if (!pub)
        return crypto_err(err, "X509_REQ_get0_pubkey");

    /* The requested subject and extensions are deliberately not looked at:
     * the identity is the one the platform assigns. */
    fm_cert_req req = {.common_name = common_name, .usage = usage, .days = days};
    if ((rc = issue_leaf(ca, pub, &req, serial_hex, &cert, err)) ||
        (rc = asn1_time_ms(X509_get0_notAfter(cert), &not_after, err)) ||
        (rc = pem_string(&(pem_obj){.cert = cert}, &pem, err)))
        goto out;
    *cert_pem = pem;
    if (not_after_ms)
        *not_after_ms = not_after;
    rc = 0;
out:
    X509_free(cert);
    return rc;
}

/* ---- revocation ------------------------------------------------------------ */

/* Parses a serial in the registry's hex format into an ASN1_INTEGER. Only
 * hex digits are accepted: BN_hex2bn alone would also take a sign and stop
 * silently at the first non-digit. */
static int serial_from_hex(const char *hex, ASN1_INTEGER **out, fm_errbuf *err)
{
    size_t n = hex ? strlen(hex) : 0;
    if (n == 0 || n > PKI_SERIAL_HEX_MAX || strspn(hex, "0123456789abcdefABCDEF") != n)
        return fm_errf(err, FM_EINVAL, "invalid certificate serial \"%.80s\"",
                       hex ? hex : "(null)");
    BIGNUM *bn = NULL;
    if (BN_hex2bn(&bn, hex) != (int)n) {
        BN_free(bn);
        return crypto_err(err, "BN_hex2bn");
    }
    ASN1_INTEGER *ai = BN_to_ASN1_INTEGER(bn, NULL);
    BN_free(bn);
    if (!ai)
        return crypto_err(err, "BN_to_ASN1_INTEGER");
    *out = ai;
    return 0;
}

static int add_revoked(X509_CRL *crl, const fm_revoked *r, fm_errbuf *err)
{
    ASN1_INTEGER *serial = NULL;
    ASN1_TIME *when = NULL;
    X509_REVOKED *rev = NULL;
    int rc = serial_from_hex(r->serial_hex, &serial, err);
    if (rc != 0)
        return rc;
    /* Floor division, so that a time before the epoch cannot round up. */
    time_t secs = (time_t)(r->revoked_ms / 1000 - (r->revoked_ms % 1000 < 0));
    when = ASN1_TIME_set(NULL, secs);
    rev = X509_REVOKED_new();
    if (!when || !rev || !X509_REVOKED_set_serialNumber(rev, serial) ||
        !X509_REVOKED_set_revocationDate(rev, when) || !X509_CRL_add0_revoked(crl, rev)) {
        rc = crypto_err(err, "adding a revoked certificate");
        goto out;
    }
    rev = NULL; /* owned by the CRL now */
    rc = 0;
out:
    X509_REVOKED_free(rev);
    ASN1_TIME_free(when);
    ASN1_INTEGER_free(serial);
    return rc;
}

/* The CRL number of the CRL currently at path, or 0 if there is none or it
 * cannot be read. Only used as a lower bound for the next number, so its
 * signature does not matter. */
static int64_t previous_crl_number(const char *path)
{
    BIO *bio = NULL;
    int64_t prev = 0;
    if (read_pem_bio(path, &bio, NULL) != 0)
        return 0;
    X509_CRL *crl = PEM_read_bio_X509_CRL(bio, NULL, no_passphrase, NULL);
    ASN1_INTEGER *num = crl ? X509_CRL_get_ext_d2i(crl, NID_crl_number, NULL, NULL) : NULL;
    if (!num || !ASN1_INTEGER_get_int64(&prev, num) || prev < 0)
        prev = 0;
    ASN1_INTEGER_free(num);
    X509_CRL_free(crl);
    BIO_free(bio);
    ERR_clear_error();
    return prev;
}

int fm_ca_write_crl(fm_ca *ca, const fm_revoked *revoked, size_t n, int days,
                    const char *path, fm_errbuf *err)
{
    X509_CRL *crl = NULL;
    ASN1_TIME *last = NULL, *next = NULL;
    ASN1_INTEGER *number = NULL;
    int rc;

    if (!ca || !path || (n > 0 && !revoked))
        return fm_errf(err, FM_EINVAL, "CA, path and the revoked list are required");
    if (days <= 0 || days > PKI_MAX_DAYS)
        return fm_errf(err, FM_EINVAL, "CRL validity must be 1..%d days, got %d",
                       PKI_MAX_DAYS, days);
    ERR_clear_error();

    time_t now = time(NULL);
    /* RFC 5280 wants the CRL number to increase strictly from one CRL to
     * the next. The current time in seconds does that without a counter
     * next to the CA; the previous CRL's number + 1 covers two CRLs written
     * within one second and a clock that went backwards. */
    int64_t prev = previous_crl_number(path);
    int64_t crl_number = prev < INT64_MAX && prev >= (int64_t)now ? prev + 1 : (int64_t)now;
    crl = X509_CRL_new();
    last = ASN1_TIME_set(NULL, now);
    next = ASN1_TIME_adj(NULL, now, days, 0);
    number = ASN1_INTEGER_new();
    if (!crl || !last || !next || !number || !ASN1_INTEGER_set_int64(number, crl_number) ||
        !X509_CRL_set_version(crl, X509_CRL_VERSION_2) ||
        !X509_CRL_set_issuer_name(crl, X509_get_subject_name(ca->cert)) ||
        !X509_CRL_set1_lastUpdate(crl, last) || !X509_CRL_set1_nextUpdate(crl, next)) {
        rc = crypto_err(err, "building CRL");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        if ((rc = add_revoked(crl, &revoked[i], err)) != 0)
            goto out;
    }
    if (!X509_CRL_add1_ext_i2d(crl, NID_crl_number, number, 0, X509V3_ADD_DEFAULT)) {
        rc = crypto_err(err, "adding CRL number");
        goto out;
    }
    if ((rc = add_ext_to(NULL, crl, ca->cert, NID_authority_key_identifier, "keyid:always",
                         err)) != 0)
        goto out;
    /* Sorted by serial, so the same set of serials gives the same CRL body
     * whatever order the database returned them in. */
    if (!X509_CRL_sort(crl) || !X509_CRL_sign(crl, ca->key, EVP_sha256())) {
        rc = crypto_err(err, "signing CRL");
        goto out;
    }
    rc = write_pem(path, &(pem_obj){.crl = crl}, 0644, err);
out:
    ASN1_INTEGER_free(number);
    ASN1_TIME_free(next);
    ASN1_TIME_free(last);
    X509_CRL_free(crl);
    return rc;
}

/* Parses one PEM certificate held in memory (len bytes); NULL when it is
 * not one. Leaves the OpenSSL error queue empty either way. */
static X509 *cert_from_pem(const char *pem, size_t len)
{
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    X509 *cert = bio ? PEM_read_bio_X509(bio, NULL, no_passphrase, NULL) : NULL;
    BIO_free(bio);
    if (!cert)
        ERR_clear_error();
    return cert;
}

int fm_cert_pem_info(const char *pem, size_t len, char *serial_hex, size_t serial_len,
                     char *cn, size_t cn_len, int64_t *not_after_ms)
{
    if (!pem || len == 0 || len > PKI_CERT_MAX_BYTES || (cn && cn_len == 0))
        return FM_EINVAL;
    ERR_clear_error();
    X509 *cert = cert_from_pem(pem, len);
    if (!cert)
        return FM_ECRYPTO;
    int rc = 0;
    int64_t not_after = 0;
    if ((serial_hex && (rc = cert_serial_hex(cert, serial_hex, serial_len, NULL))) ||
        (cn && (rc = cert_cn(cert, "certificate", cn, cn_len, NULL))) ||
        (rc = asn1_time_ms(X509_get0_notAfter(cert), &not_after, NULL)))
        goto out;
    if (not_after_ms)
        *not_after_ms = not_after;
out:
    ERR_clear_error();
    X509_free(cert);
    return rc;
}

int fm_csr_matches_cert_pem(const fm_csr *csr, const char *cert_pem)
{
    size_t len = cert_pem ? strlen(cert_pem) : 0;
    if (!csr || len == 0 || len > PKI_CERT_MAX_BYTES)
        return FM_EINVAL;
    X509 *cert = cert_from_pem(cert_pem, len);
    if (!cert)
        return FM_ECRYPTO;
    /* Both are borrowed references owned by their objects. */
    EVP_PKEY *a = X509_REQ_get0_pubkey(csr->req);
    EVP_PKEY *b = X509_get0_pubkey(cert);
    int same = a && b && EVP_PKEY_eq(a, b) == 1;
    ERR_clear_error();
    X509_free(cert);
    return same;
}

int fm_csr_key_id(const fm_csr *csr, char *hex, size_t len)
{
    if (!csr || !hex || len < FM_KEY_ID_LEN + 1)
        return FM_EINVAL;
    EVP_PKEY *k = X509_REQ_get0_pubkey(csr->req);
    unsigned char *der = NULL;
    int n = k ? i2d_PUBKEY(k, &der) : -1;
    unsigned char md[32];
    unsigned int mdlen = 0;
    int ok = n > 0 && EVP_Digest(der, (size_t)n, md, &mdlen, EVP_sha256(), NULL) == 1 &&
             mdlen == sizeof md;
    OPENSSL_free(der);
    ERR_clear_error();
    if (!ok)
        return FM_ECRYPTO;
    for (unsigned i = 0; i < sizeof md; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    return 0;
}

/* ---- device side ------------------------------------------------------------ */

int fm_key_ensure(const char *key_path, fm_errbuf *err)
{
    struct stat st;
    if (!key_path)
        return fm_errf(err, FM_EINVAL, "key path is required");
    /* An existing key is kept as it is: it may be the one a certificate
     * was already issued for. Concurrent callers for the same path are not
     * supported (the last writer would win). */
    if (stat(key_path, &st) == 0) {
        if (!S_ISREG(st.st_mode))
            return fm_errf(err, FM_EIO, "%s exists and is not a regular file", key_path);
        return 0;
    }
    if (errno != ENOENT)
        return fm_errf(err, FM_EIO, "%s: %s", key_path, strerror(errno));
    ERR_clear_error();
    EVP_PKEY *key = gen_p256();
    if (!key)
        return crypto_err(err, "generating P-256 key");
    int rc = write_pem(key_path, &(pem_obj){.key = key}, 0600, err);
    EVP_PKEY_free(key);
    return rc;
}

int fm_csr_create(const char *key_path, const char *cn, char **pem, fm_errbuf *err)
{
    EVP_PKEY *key = NULL;
    X509_REQ *req = NULL;
    int rc;

    if (!key_path || !pem)
        return fm_errf(err, FM_EINVAL, "key path and pem are required");
    *pem = NULL;
    ERR_clear_error();
    if ((rc = load_key(key_path, &key, err)) != 0)
        return rc;
    req = X509_REQ_new();
    if (!req || !X509_REQ_set_version(req, X509_REQ_VERSION_1)) {
        rc = crypto_err(err, "X509_REQ_new");
        goto out;
    }
    /* An empty subject is valid PKCS#10; the CA sets the real CN anyway. */
    if (cn && *cn &&
        !X509_NAME_add_entry_by_NID(X509_REQ_get_subject_name(req), NID_commonName,
                                    MBSTRING_UTF8, (const unsigned char *)cn, -1, -1, 0)) {
        rc = crypto_err(err, "setting request subject CN");
        goto out;
    }
    if (!X509_REQ_set_pubkey(req, key) || !X509_REQ_sign(req, key, EVP_sha256())) {
        rc = crypto_err(err, "signing certificate request");
        goto out;
    }
    rc = pem_string(&(pem_obj){.req = req}, pem, err);
out:
    X509_REQ_free(req);
    EVP_PKEY_free(key);
    return rc;
}
