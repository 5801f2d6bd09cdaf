/*
 * Unit tests for the platform PKI (src/pki/pki.c).
 *
 * Each test gets a fresh temporary directory with one CA already created,
 * so tests stay independent and can run in any order. Certificates are
 * inspected with OpenSSL directly rather than through pki.h, so the tests
 * check what a TLS peer will actually see.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "fleetml/pki.h"

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#define CA_CN "fleetml test CA"

typedef struct fixture {
    char dir[64];
    char ca_key[128];
    char ca_cert[128];
} fixture;

static void path_in(const fixture *f, char *out, size_t len, const char *name)
{
    int n = snprintf(out, len, "%s/%s", f->dir, name);
    assert_true(n > 0 && (size_t)n < len);
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    if (!f)
        return -1;
    strcpy(f->dir, "/tmp/fm-test-pki-XXXXXX");
    if (!mkdtemp(f->dir)) {
        free(f);
        return -1;
    }
    snprintf(f->ca_key, sizeof f->ca_key, "%s/ca.key", f->dir);
    snprintf(f->ca_cert, sizeof f->ca_cert, "%s/ca.crt", f->dir);
    fm_errbuf err = {{0}};
    if (fm_ca_create(f->ca_key, f->ca_cert, CA_CN, 30, &err) != 0) {
        fprintf(stderr, "fm_ca_create: %s\n", err.msg);
        free(f);
        return -1;
    }
    *state = f;
    return 0;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int teardown(void **state)
{
    fixture *f = *state;
    nftw(f->dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static X509 *read_cert(const char *path)
{
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    X509 *cert = PEM_read_X509(fp, NULL, NULL, NULL);
    fclose(fp);
    assert_non_null(cert);
    return cert;
}

static unsigned file_mode(const char *path)
{
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    return (unsigned)(st.st_mode & 07777);
}

/* Issues a certificate from the fixture's CA into dir/<name>.key|.crt. */
static void issue(const fixture *f, const char *name, const char *cn, enum fm_cert_usage usage,
                  const char *const *dns, const char *const *ips, char *serial)
{
    char key[160], crt[160], kname[64], cname[64];
    snprintf(kname, sizeof kname, "%s.key", name);
    snprintf(cname, sizeof cname, "%s.crt", name);
    path_in(f, key, sizeof key, kname);
    path_in(f, crt, sizeof crt, cname);
    fm_errbuf err = {{0}};
    fm_ca *ca = NULL;
    assert_int_equal(fm_ca_load(f->ca_key, f->ca_cert, &ca, &err), 0);
    fm_cert_req req = {.common_name = cn, .dns_sans = dns, .ip_sans = ips, .usage = usage,
                       .days = 10};
    int rc = fm_ca_issue_keypair(ca, &req, key, crt, serial, &err);
    if (rc != 0)
        fprintf(stderr, "fm_ca_issue_keypair: %s\n", err.msg);
    assert_int_equal(rc, 0);
    fm_ca_free(ca);
}

static void test_ca_files_and_extensions(void **state)
{
    fixture *f = *state;
    assert_int_equal(file_mode(f->ca_key), 0600);
    assert_int_equal(file_mode(f->ca_cert), 0644);

    char cn[128];
    fm_errbuf err = {{0}};
    assert_int_equal(fm_cert_file_cn(f->ca_cert, cn, sizeof cn, &err), 0);
    assert_string_equal(cn, CA_CN);

    X509 *ca = read_cert(f->ca_cert);
    /* X509_check_ca returns 1 for a proper CA with basicConstraints. */
    assert_int_equal(X509_check_ca(ca), 1);
    assert_int_equal(X509_get_pathlen(ca), 0);
    uint32_t ku = X509_get_key_usage(ca);
    assert_true(ku & KU_KEY_CERT_SIGN);
    assert_true(ku & KU_CRL_SIGN);
    assert_false(ku & KU_DIGITAL_SIGNATURE);
    assert_non_null(X509_get0_subject_key_id(ca));
    assert_int_equal(X509_get_signature_nid(ca), NID_ecdsa_with_SHA256);
    /* Self-signed: issuer equals subject and the signature verifies. */
    assert_int_equal(X509_NAME_cmp(X509_get_subject_name(ca), X509_get_issuer_name(ca)), 0);
    assert_int_equal(X509_verify(ca, X509_get0_pubkey(ca)), 1);
    /* The serial is positive and at most 20 octets (159 random bits). */
    const ASN1_INTEGER *serial = X509_get0_serialNumber(ca);
    BIGNUM *bn = ASN1_INTEGER_to_BN(serial, NULL);
    assert_non_null(bn);
    assert_false(BN_is_negative(bn));
    assert_true(BN_num_bits(bn) <= 159);
    BN_free(bn);
    X509_free(ca);
}

static void test_issue_server_cert(void **state)
{
    fixture *f = *state;
    const char *dns[] = {"localhost", "broker.example", NULL};
    const char *ips[] = {"127.0.0.1", "::1", NULL};
    char serial[41] = "";
    issue(f, "server", "fleetml-broker", FM_CERT_SERVER, dns, ips, serial);

    char key[160], crt[160];
    path_in(f, key, sizeof key, "server.key");
    path_in(f, crt, sizeof crt, "server.crt");
    assert_int_equal(file_mode(key), 0600);
    assert_int_equal(file_mode(crt), 0644);

    fm_errbuf err = {{0}};
    assert_int_equal(fm_cert_verify_file(f->ca_cert, crt, &err), 0);

    /* The returned serial is lowercase hex and matches the certificate. */
    size_t n = strlen(serial);
    assert_true(n > 0 && n <= 40);
    for (size_t i = 0; i < n; i++)
        assert_non_null(strchr("0123456789abcdef", serial[i]));
    X509 *cert = read_cert(crt);
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), NULL);
    char *hex = BN_bn2hex(bn);
    assert_int_equal(strcasecmp(hex, serial), 0);
    OPENSSL_free(hex);
    BN_free(bn);

    assert_int_equal(X509_check_host(cert, "localhost", 0, 0, NULL), 1);
    assert_int_equal(X509_check_host(cert, "broker.example", 0, 0, NULL), 1);
    assert_int_equal(X509_check_host(cert, "other.example", 0, 0, NULL), 0);
    assert_int_equal(X509_check_ip_asc(cert, "127.0.0.1", 0), 1);
    assert_int_equal(X509_check_ip_asc(cert, "::1", 0), 1);
    assert_int_equal(X509_check_ca(cert), 0);
    /* serverAuth only: a broker certificate must not work as a client. */
    assert_int_equal(X509_check_purpose(cert, X509_PURPOSE_SSL_SERVER, 0), 1);
    assert_int_not_equal(X509_check_purpose(cert, X509_PURPOSE_SSL_CLIENT, 0), 1);
    assert_true(X509_get_key_usage(cert) & KU_DIGITAL_SIGNATURE);
    assert_non_null(X509_get0_authority_key_id(cert));

    /* notBefore is backdated by about five minutes for clock skew. */
    time_t now = time(NULL);
    time_t four_min_ago = now - 4 * 60, six_min_ago = now - 6 * 60;
    assert_true(X509_cmp_time(X509_get0_notBefore(cert), &four_min_ago) < 0);
    assert_true(X509_cmp_time(X509_get0_notBefore(cert), &six_min_ago) > 0);
    X509_free(cert);
}

static void test_issue_client_cert(void **state)
{
    fixture *f = *state;
    char serial1[41], serial2[41];
    issue(f, "dev1", "dev-001", FM_CERT_CLIENT, NULL, NULL, serial1);
    issue(f, "dev2", "dev-002", FM_CERT_CLIENT, NULL, NULL, serial2);
    assert_string_not_equal(serial1, serial2);

    char crt[160], cn[65];
    path_in(f, crt, sizeof crt, "dev1.crt");
    fm_errbuf err = {{0}};
    assert_int_equal(fm_cert_verify_file(f->ca_cert, crt, &err), 0);
    assert_int_equal(fm_cert_file_cn(crt, cn, sizeof cn, &err), 0);
    assert_string_equal(cn, "dev-001");

    X509 *cert = read_cert(crt);
    assert_int_equal(X509_check_purpose(cert, X509_PURPOSE_SSL_CLIENT, 0), 1);
    assert_int_not_equal(X509_check_purpose(cert, X509_PURPOSE_SSL_SERVER, 0), 1);
    /* No SANs were requested, so none must be present. */
    assert_null(X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL));
    X509_free(cert);

    /* A CN that does not fit the buffer is reported, not truncated. */
    char small[4];
    assert_int_equal(fm_cert_file_cn(crt, small, sizeof small, &err), FM_EINVAL);
}

static void test_foreign_ca_rejected(void **state)
{
    fixture *f = *state;
    char key2[160], crt2[160], dkey[160], dcrt[160];
    path_in(f, key2, sizeof key2, "ca2.key");
    path_in(f, crt2, sizeof crt2, "ca2.crt");
    path_in(f, dkey, sizeof dkey, "evil.key");
    path_in(f, dcrt, sizeof dcrt, "evil.crt");
    fm_errbuf err = {{0}};
    /* Same CN on purpose: only the key may decide, never the name. */
    assert_int_equal(fm_ca_create(key2, crt2, CA_CN, 30, &err), 0);
    fm_ca *ca2 = NULL;
    assert_int_equal(fm_ca_load(key2, crt2, &ca2, &err), 0);
    fm_cert_req req = {.common_name = "dev-001", .usage = FM_CERT_CLIENT, .days = 10};
    assert_int_equal(fm_ca_issue_keypair(ca2, &req, dkey, dcrt, NULL, &err), 0);
    fm_ca_free(ca2);

    assert_int_equal(fm_cert_verify_file(crt2, dcrt, &err), 0);
    err.msg[0] = '\0';
    assert_int_equal(fm_cert_verify_file(f->ca_cert, dcrt, &err), FM_ECRYPTO);
    assert_non_null(strstr(err.msg, "verification failed"));

    /* The other CA's certificate itself is not trusted either. */
    assert_int_equal(fm_cert_verify_file(f->ca_cert, crt2, &err), FM_ECRYPTO);
}

static void test_create_refuses_overwrite(void **state)
{
    fixture *f = *state;
    char *before = NULL, *after = NULL;
    size_t blen = 0, alen = 0;
    assert_int_equal(fm_read_file(f->ca_key, &before, &blen), 0);

    fm_errbuf err = {{0}};
    assert_int_equal(fm_ca_create(f->ca_key, f->ca_cert, "other", 30, &err), FM_EEXIST);
    assert_true(strlen(err.msg) > 0);

    /* Only one of the two files existing must be refused as well, and the
     * file that did not exist must not be left behind. */
    char newkey[160];
    path_in(f, newkey, sizeof newkey, "new.key");
    assert_int_equal(fm_ca_create(newkey, f->ca_cert, "other", 30, &err), FM_EEXIST);
    assert_int_not_equal(access(newkey, F_OK), 0);

    assert_int_equal(fm_read_file(f->ca_key, &after, &alen), 0);
    assert_int_equal(alen, blen);
    assert_memory_equal(before, after, blen);
    fm_free(before);
    fm_free(after);
    assert_int_equal(file_mode(f->ca_key), 0600);
}

static void test_load_errors(void **state)
{
    fixture *f = *state;
    fm_errbuf err = {{0}};
    fm_ca *ca = (fm_ca *)&err; /* must be reset to NULL on failure */
    char missing[160], key2[160], crt2[160];
    path_in(f, missing, sizeof missing, "missing.pem");
    path_in(f, key2, sizeof key2, "ca2.key");
    path_in(f, crt2, sizeof crt2, "ca2.crt");

    assert_int_equal(fm_ca_load(missing, f->ca_cert, &ca, &err), FM_ENOTFOUND);
    assert_null(ca);
    assert_int_equal(fm_ca_load(f->ca_key, missing, &ca, &err), FM_ENOTFOUND);
    assert_null(ca);

    assert_int_equal(fm_ca_create(key2, crt2, "second", 30, &err), 0);
    err.msg[0] = '\0';
    assert_int_equal(fm_ca_load(key2, f->ca_cert, &ca, &err), FM_ECRYPTO);
    assert_null(ca);
    assert_true(strlen(err.msg) > 0);

    /* Garbage where the key should be. */
    char junk[160];
    path_in(f, junk, sizeof junk, "junk.pem");
    assert_int_equal(fm_write_file_atomic(junk, "not a key\n", 10, 0600), 0);
    assert_int_equal(fm_ca_load(junk, f->ca_cert, &ca, &err), FM_ECRYPTO);

    /* A leaf certificate with its own key is not a CA. */
    issue(f, "leaf", "dev-009", FM_CERT_CLIENT, NULL, NULL, NULL);
    char lkey[160], lcrt[160];
    path_in(f, lkey, sizeof lkey, "leaf.key");
    path_in(f, lcrt, sizeof lcrt, "leaf.crt");
    assert_int_equal(fm_ca_load(lkey, lcrt, &ca, &err), FM_ECRYPTO);

    assert_int_equal(fm_cert_file_cn(missing, junk, sizeof junk, &err), FM_ENOTFOUND);
    assert_int_equal(fm_cert_verify_file(f->ca_cert, missing, &err), FM_ENOTFOUND);
}

static void test_invalid_requests(void **state)
{
    fixture *f = *state;
    fm_errbuf err = {{0}};
    fm_ca *ca = NULL;
    assert_int_equal(fm_ca_load(f->ca_key, f->ca_cert, &ca, &err), 0);
    char key[160], crt[160];
    path_in(f, key, sizeof key, "bad.key");
    path_in(f, crt, sizeof crt, "bad.crt");

    const char *bad_dns[] = {"ok.example,DNS:evil.example", NULL};
    const char *bad_ip[] = {"999.1.1.1", NULL};
    fm_cert_req req = {.common_name = "x", .usage = FM_CERT_SERVER, .days = 1,
                       .dns_sans = bad_dns};
    assert_int_equal(fm_ca_issue_keypair(ca, &req, key, crt, NULL, &err), FM_EINVAL);
    req.dns_sans = NULL;
    req.ip_sans = bad_ip;
    assert_int_equal(fm_ca_issue_keypair(ca, &req, key, crt, NULL, &err), FM_EINVAL);
    req.ip_sans = NULL;
    req.days = 0;
    assert_int_equal(fm_ca_issue_keypair(ca, &req, key, crt, NULL, &err), FM_EINVAL);
    req.days = 1;
    req.usage = (enum fm_cert_usage)7;
    assert_int_equal(fm_ca_issue_keypair(ca, &req, key, crt, NULL, &err), FM_EINVAL);
    req.usage = FM_CERT_CLIENT;
    req.common_name = "";
    assert_int_equal(fm_ca_issue_keypair(ca, &req, key, crt, NULL, &err), FM_EINVAL);
    /* RFC 5280 limits a CN to 64 characters; OpenSSL enforces it. */
    char longcn[80];
    memset(longcn, 'a', sizeof longcn - 1);
    longcn[sizeof longcn - 1] = '\0';
    req.common_name = longcn;
    assert_int_equal(fm_ca_issue_keypair(ca, &req, key, crt, NULL, &err), FM_ECRYPTO);
    assert_true(strlen(err.msg) > 0);
    /* Nothing is written for a refused request. */
    assert_int_not_equal(access(key, F_OK), 0);
    assert_int_not_equal(access(crt, F_OK), 0);
    fm_ca_free(ca);
}

/* Walks every project allocation in fm_ca_load: each must either succeed or
 * fail cleanly (ASan reports any leak on the failure paths). */
static void test_load_alloc_failures(void **state)
{
    fixture *f = *state;
    int succeeded = 0;
    for (long n = 0; n < 16 && !succeeded; n++) {
        fm_errbuf err = {{0}};
        fm_ca *ca = NULL;
        fm_alloc_fail_after(n);
        int rc = fm_ca_load(f->ca_key, f->ca_cert, &ca, &err);
        fm_alloc_fail_after(-1);
        if (rc == 0) {
            assert_non_null(ca);
            fm_ca_free(ca);
            succeeded = 1;
        } else {
            assert_null(ca);
        }
    }
    assert_true(succeeded);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_ca_files_and_extensions, setup, teardown),
        cmocka_unit_test_setup_teardown(test_issue_server_cert, setup, teardown),
        cmocka_unit_test_setup_teardown(test_issue_client_cert, setup, teardown),
        cmocka_unit_test_setup_teardown(test_foreign_ca_rejected, setup, teardown),
        cmocka_unit_test_setup_teardown(test_create_refuses_overwrite, setup, teardown),
        cmocka_unit_test_setup_teardown(test_load_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_invalid_requests, setup, teardown),
        cmocka_unit_test_setup_teardown(test_load_alloc_failures, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
