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
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

struct fm_ca {
    EVP_PKEY *key;
    X509 *cert;
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

static int load_cert(const char *path, X509 **out, fm_errbuf *err)
{
    BIO *bio = NULL;
    int rc = read_pem_bio(path, &bio, err);
    if (rc != 0)
        return rc;
    X509 *cert = PEM_read_bio_X509(bio, NULL, NULL, NULL);
    BIO_free(bio);
    if (!cert) {
        char what[300];
        snprintf(what, sizeof what, "%s: reading PEM certificate", path);
        return crypto_err(err, what);
    }
    *out = cert;
    return 0;
}

/* Serialises key (PKCS#8, unencrypted) or cert to PEM and writes it
 * atomically with the given mode. Exactly one of key/cert is non-NULL. */
static int write_pem(const char *path, EVP_PKEY *key, X509 *cert, unsigned mode,
                     fm_errbuf *err)
{
    BIO *bio = BIO_new(key ? BIO_s_secmem() : BIO_s_mem());
    if (!bio)
        return crypto_err(err, "BIO_new");
    int ok = key ? PEM_write_bio_PKCS8PrivateKey(bio, key, NULL, NULL, 0, NULL, NULL)
                 : PEM_write_bio_X509(bio, cert);
    if (!ok) {
        BIO_free(bio);
        return crypto_err(err, key ? "PEM_write_bio_PKCS8PrivateKey" : "PEM_write_bio_X509");
    }
    char *data = NULL;
    long len = BIO_get_mem_data(bio, &data);
    int rc = fm_write_file_atomic(path, data, (size_t)len, mode);
    BIO_free(bio);
    if (rc != 0)
        return fm_errf(err, rc, "writing %s: %s", path, fm_strerror(rc));
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
    char *hex = NULL;
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
    if (hex_out) {
        hex = BN_bn2hex(bn);
        if (!hex) {
            rc = crypto_err(err, "BN_bn2hex");
            goto out;
        }
        /* BN_bn2hex yields at most 40 upper-case digits for 159 bits. */
        size_t i = 0;
        for (; hex[i]; i++)
            hex_out[i] = (char)(hex[i] >= 'A' && hex[i] <= 'F' ? hex[i] - 'A' + 'a' : hex[i]);
        hex_out[i] = '\0';
    }
    rc = 0;
out:
    OPENSSL_free(hex);
    ASN1_INTEGER_free(ai);
    BN_free(bn);
    return rc;
}

/* Adds one extension given in OpenSSL's config syntax. Only called with
 * constant values from this file, never with user input, so the config
 * parser cannot be abused to inject extra extension content. */
static int add_ext(X509 *cert, X509 *issuer, int nid, const char *value, fm_errbuf *err)
{
    X509V3_CTX ctx;
    X509V3_set_ctx(&ctx, issuer, cert, NULL, NULL, 0);
    X509_EXTENSION *ext = X509V3_EXT_nconf_nid(NULL, &ctx, nid, value);
    if (!ext || !X509_add_ext(cert, ext, -1)) {
        X509_EXTENSION_free(ext);
        char what[128];
        snprintf(what, sizeof what, "adding extension %s", OBJ_nid2sn(nid));
        return crypto_err(err, what);
    }
    X509_EXTENSION_free(ext);
    return 0;
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
    if ((rc = write_pem(key_path, key, NULL, 0600, err)) ||
        (rc = write_pem(cert_path, NULL, cert, 0644, err)))
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
    BIO *bio = NULL;
    EVP_PKEY *key = NULL;
    X509 *cert = NULL;
    fm_ca *ca = NULL;
    int rc;

    if (!key_path || !cert_path || !out)
        return fm_errf(err, FM_EINVAL, "key path, certificate path and out are required");
    *out = NULL;
    ERR_clear_error();

    rc = load_cert(cert_path, &cert, err);
    if (rc != 0)
        goto out;
    rc = read_pem_bio(key_path, &bio, err);
    if (rc != 0)
        goto out;
    key = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
    if (!key) {
        rc = crypto_err(err, "reading CA private key");
        goto out;
    }
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
    ca = fm_malloc(sizeof *ca);
    if (!ca) {
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
        goto out;
    }
    ca->key = key;
    ca->cert = cert;
    key = NULL;
    cert = NULL;
    *out = ca;
    rc = 0;
out:
    EVP_PKEY_free(key);
    X509_free(cert);
    BIO_free(bio);
    return rc;
}

void fm_ca_free(fm_ca *ca)
{
    if (!ca)
        return;
    EVP_PKEY_free(ca->key);
    X509_free(ca->cert);
    fm_free(ca);
}

int fm_ca_issue_keypair(fm_ca *ca, const fm_cert_req *req, const char *key_path,
                        const char *cert_path, char *serial_hex, fm_errbuf *err)
{
    EVP_PKEY *key = NULL;
    X509 *cert = NULL;
    int rc;

    if (!ca || !req || !key_path || !cert_path)
        return fm_errf(err, FM_EINVAL, "CA, request and paths are required");
    rc = check_common_args(req->common_name, req->days, err);
    if (rc != 0)
        return rc;
    const char *eku;
    switch (req->usage) {
    case FM_CERT_SERVER: eku = "serverAuth"; break;
    case FM_CERT_CLIENT: eku = "clientAuth"; break;
    default: return fm_errf(err, FM_EINVAL, "unknown certificate usage %d", (int)req->usage);
    }
    ERR_clear_error();

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
    rc = init_cert(cert, ca->cert, key, req->common_name, req->days, serial_hex, err);
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
    if ((rc = write_pem(key_path, key, NULL, 0600, err)) ||
        (rc = write_pem(cert_path, NULL, cert, 0644, err)))
        goto out;
    rc = 0;
out:
    X509_free(cert);
    EVP_PKEY_free(key);
    return rc;
}

int fm_cert_file_cn(const char *path, char *cn, size_t cn_len, fm_errbuf *err)
{
    X509 *cert = NULL;
    unsigned char *utf8 = NULL;
    int rc;

    if (!path || !cn || cn_len == 0)
        return fm_errf(err, FM_EINVAL, "path and a non-empty buffer are required");
    ERR_clear_error();
    rc = load_cert(path, &cert, err);
    if (rc != 0)
        return rc;

    X509_NAME *name = X509_get_subject_name(cert);
    int idx = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
    /* A subject with two CNs is ambiguous (different consumers pick
     * different ones), so it is treated like one without a CN. */
    if (idx < 0 || X509_NAME_get_index_by_NID(name, NID_commonName, idx) >= 0) {
        rc = fm_errf(err, FM_ECRYPTO, "%s: subject has no single common name", path);
        goto out;
    }
    ASN1_STRING *data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, idx));
    int n = ASN1_STRING_to_UTF8(&utf8, data);
    if (n < 0) {
        rc = crypto_err(err, "decoding common name");
        goto out;
    }
    if (memchr(utf8, '\0', (size_t)n)) {
        rc = fm_errf(err, FM_ECRYPTO, "%s: common name contains a NUL byte", path);
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
