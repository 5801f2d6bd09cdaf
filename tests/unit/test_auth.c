/*
 * Users, sessions and tokens: password policy, sign-in and throttling (with
 * an injected clock), the role table, JWT signing and every way a token
 * must be refused, refresh rotation with reuse detection, logout and the
 * revocations that password changes and disabling imply.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "store_backend.h"

#include <cmocka.h>

#include "fleetml/auth.h"
#include "fleetml/config.h"
#include "fleetml/store.h"

#include <ftw.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define T0 1900000000000LL /* a fixed "now" in ms */
#define PW "violet-tram-window-42"
#define PW2 "another quite long phrase"

typedef struct fx {
    char dir[64];
    char key_path[128];
    fm_config cfg;
    fm_store *st;
    fm_jwt_key *key;
} fx;

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

static int setup(void **state)
{
    fx *f = calloc(1, sizeof *f);
    snprintf(f->dir, sizeof f->dir, "/tmp/fm-auth-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    assert_int_equal(fm_config_defaults(&f->cfg, f->dir), 0);
    assert_int_equal(test_store_backend(&f->cfg), 0);
    fm_errbuf err;
    assert_int_equal(fm_store_open(&f->cfg, &f->st, &err), 0);
    assert_int_equal(fm_store_tenant_ensure(f->st, "t1", &err), 0);
    assert_int_equal(fm_store_tenant_ensure(f->st, "t2", &err), 0);
    snprintf(f->key_path, sizeof f->key_path, "%s/jwt.key", f->dir);
    assert_int_equal(fm_jwt_key_create(f->key_path, &err), 0);
    assert_int_equal(fm_jwt_key_load(f->key_path, &f->key, &err), 0);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    fm_jwt_key_free(f->key);
    fm_store_close(f->st);
    nftw(f->dir, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static void add_user(fx *f, const char *tenant, const char *name, const char *roles)
{
    fm_errbuf err = {{0}};
    const char *why = NULL;
    int rc = fm_auth_user_create(f->st, tenant, name, PW, roles, &why, &err);
    if (rc)
        fail_msg("user_create: %d %s %s", rc, err.msg, why ? why : "");
}

static double ms_since(uint64_t t0) { return (double)(fm_mono_ns() - t0) / 1e6; }

/* ---- password policy ---------------------------------------------------------- */

static void test_policy(void **state)
{
    (void)state;
    const char *why = NULL;
    assert_int_equal(fm_password_check_policy("short-pw-11", NULL, &why), FM_EINVAL);
    assert_non_null(strstr(why, "too short"));
    assert_int_equal(fm_password_check_policy("twelve-chars", NULL, &why), 0);
    char max[FM_PASSWORD_MAX + 2];
    memset(max, 'x', FM_PASSWORD_MAX);
    max[FM_PASSWORD_MAX - 1] = 'y';
    max[FM_PASSWORD_MAX] = '\0';
    assert_int_equal(fm_password_check_policy(max, NULL, &why), 0);
    max[FM_PASSWORD_MAX] = 'z';
    max[FM_PASSWORD_MAX + 1] = '\0';
    assert_int_equal(fm_password_check_policy(max, NULL, &why), FM_EINVAL);
    assert_non_null(strstr(why, "too long"));
    /* Common passwords, in any case; no composition rules otherwise. */
    assert_int_equal(fm_password_check_policy("123456789012", NULL, &why), FM_EINVAL);
    assert_non_null(strstr(why, "common"));
    assert_int_equal(fm_password_check_policy("PassWordPassWord", NULL, &why), FM_EINVAL);
    assert_int_equal(fm_password_check_policy("qwertyuiopas", NULL, &why), FM_EINVAL);
    assert_int_equal(fm_password_check_policy("111111111111", NULL, &why), FM_EINVAL);
    assert_int_equal(fm_password_check_policy("all lower case words", NULL, &why), 0);
    /* Code points, not bytes: 11 two-byte characters are too short. */
    assert_int_equal(fm_password_check_policy("\xc3\xa4\xc3\xb6\xc3\xbc\xc3\xa4\xc3\xb6\xc3\xbc"
                                              "\xc3\xa4\xc3\xb6\xc3\xbc\xc3\xa4\xc3\xb6",
                                              NULL, &why),
                     FM_EINVAL);
    assert_int_equal(fm_password_check_policy("\xc3\xa4\xc3\xb6\xc3\xbc\xc3\xa4\xc3\xb6\xc3\xbc"
                                              "\xc3\xa4\xc3\xb6\xc3\xbc\xc3\xa4\xc3\xb6\xc3\xbc",
                                              NULL, &why),
                     0);
    assert_int_equal(fm_password_check_policy("bad utf8 \xc3\x28 here", NULL, &why), FM_EINVAL);
    assert_int_equal(fm_password_check_policy("control\tchar here", NULL, &why), FM_EINVAL);
    /* The username is context: refused inside the password. */
    assert_int_equal(fm_password_check_policy("my name is Alice.B ok", "alice.b", &why),
                     FM_EINVAL);
    assert_non_null(strstr(why, "username"));
    assert_int_equal(fm_password_check_policy(PW, "alice.b", &why), 0);
    assert_int_equal(fm_password_check_policy(NULL, NULL, &why), FM_EINVAL);
}

/* A megabyte of password is refused without being scanned or hashed. */
static void test_huge_password_fast(void **state)
{
    fx *f = *state;
    add_user(f, "t1", "alice", "clinician");
    size_t n = 1 << 20;
    char *big = malloc(n + 1);
    memset(big, 'a', n);
    big[n] = '\0';
    const char *why = NULL;
    char hash[FM_PASSWORD_HASH_MAX];
    fm_user u;
    int64_t retry;
    uint64_t t0 = fm_mono_ns();
    assert_int_equal(fm_password_check_policy(big, NULL, &why), FM_EINVAL);
    assert_int_equal(fm_password_hash(big, hash, sizeof hash), FM_EINVAL);
    assert_int_equal(fm_password_verify(big, "$argon2id$v=19$m=19456,t=2,p=1$x$y"), FM_EINVAL);
    assert_int_equal(fm_auth_login(f->st, "t1", "alice", big, "10.0.0.1", T0, &u, &retry),
                     FM_EINVAL);
    double ms = ms_since(t0);
    assert_true(ms < 50.0);
    /* One argon2id verification, for comparison, takes far longer. */
    t0 = fm_mono_ns();
    assert_int_equal(fm_auth_login(f->st, "t1", "alice", PW, "10.0.0.1", T0, &u, &retry), 0);
    print_message("1 MB password refused in %.2f ms; a real sign-in took %.1f ms\n", ms,
                  ms_since(t0));
    free(big);
}

/* Every entry of the data file is refused, so the compiled-in .inc cannot
 * drift from it (and its sort order suits bsearch). */
static void test_common_list_in_sync(void **state)
{
    (void)state;
    const char *src = getenv("FM_SOURCE_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/src/api/common-passwords.txt", src ? src : ".");
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    char line[256];
    int n = 0;
    while (fgets(line, sizeof line, fp)) {
        line[strcspn(line, "\n")] = '\0';
        if (strlen(line) < FM_PASSWORD_MIN)
            continue;
        if (!fm_password_is_common(line))
            fail_msg("'%s' is in common-passwords.txt but not refused", line);
        for (char *p = line; *p; p++)
            if (*p >= 'a' && *p <= 'z')
                *p = (char)(*p - 'a' + 'A');
        assert_true(fm_password_is_common(line));
        n++;
    }
    fclose(fp);
    assert_true(n >= 1000);
    assert_false(fm_password_is_common(PW));
}

static void test_username_normalize(void **state)
{
    (void)state;
    char out[65];
    assert_int_equal(fm_username_normalize("Alice.B@Ward-3", out, sizeof out), 0);
    assert_string_equal(out, "alice.b@ward-3");
    assert_int_equal(fm_username_normalize("", out, sizeof out), FM_EINVAL);
    assert_int_equal(fm_username_normalize(".alice", out, sizeof out), FM_EINVAL);
    assert_int_equal(fm_username_normalize("al ice", out, sizeof out), FM_EINVAL);
    assert_int_equal(fm_username_normalize("al'ice", out, sizeof out), FM_EINVAL);
    char longname[80];
    memset(longname, 'a', 65);
    longname[65] = '\0';
    assert_int_equal(fm_username_normalize(longname, out, sizeof out), FM_EINVAL);
}

/* ---- sign-in ------------------------------------------------------------------- */

static void test_login(void **state)
{
    fx *f = *state;
    fm_errbuf err = {{0}};
    const char *why = NULL;
    add_user(f, "t1", "Alice", "clinician,data_scientist");
    /* Duplicates, unknown tenants and weak passwords are refused. */
    assert_int_equal(fm_auth_user_create(f->st, "t1", "alice", PW, "clinician", &why, &err),
                     FM_EEXIST);
    assert_int_equal(fm_auth_user_create(f->st, "nope", "bob", PW, "clinician", &why, &err),
                     FM_ENOTFOUND);
    assert_int_equal(fm_auth_user_create(f->st, "t1", "bob", "password1234", "clinician", &why,
                                         &err),
                     FM_EINVAL);
    assert_int_equal(fm_auth_user_create(f->st, "t1", "bob", PW, "root", &why, &err), FM_EINVAL);

    fm_user u;
    int64_t retry = -1;
    assert_int_equal(fm_auth_login(f->st, "t1", "ALICE", PW, "10.0.0.1", T0, &u, &retry), 0);
    assert_int_equal(retry, 0);
    assert_string_equal(u.username, "alice");
    assert_string_equal(u.tenant, "t1");
    assert_string_equal(u.roles, "clinician,data_scientist");
    assert_string_equal(u.password_hash, "");
    /* Wrong password, unknown user, unknown tenant, invalid username and the
     * right password in the wrong tenant all look the same. */
    assert_int_equal(fm_auth_login(f->st, "t1", "alice", PW2, "10.0.0.1", T0, &u, &retry),
                     FM_EPERM);
    assert_int_equal(fm_auth_login(f->st, "t1", "mallory", PW, "10.0.0.1", T0, &u, &retry),
                     FM_EPERM);
    assert_int_equal(fm_auth_login(f->st, "t2", "alice", PW, "10.0.0.1", T0, &u, &retry),
                     FM_EPERM);
    assert_int_equal(fm_auth_login(f->st, "zz", "alice", PW, "10.0.0.1", T0, &u, &retry),
                     FM_EPERM);
    assert_int_equal(fm_auth_login(f->st, "t1", "bad name!", PW, "10.0.0.1", T0, &u, &retry),
                     FM_EPERM);
    /* A disabled account is refused even with the right password. */
    assert_int_equal(fm_auth_user_set_status(f->st, "t1", "alice", FM_USER_DISABLED, &err), 0);
    assert_int_equal(fm_auth_login(f->st, "t1", "alice", PW, "10.0.0.2", T0, &u, &retry),
                     FM_EPERM);
    assert_int_equal(fm_auth_user_set_status(f->st, "t1", "alice", FM_USER_ACTIVE, &err), 0);
    assert_int_equal(fm_auth_login(f->st, "t1", "alice", PW, "10.0.0.2", T0, &u, &retry), 0);
}

/* A missing user costs an argon2id verification too (no timing oracle).
 * The bound is loose on purpose: the machine may be busy. */
static void test_no_enumeration_by_timing(void **state)
{
    fx *f = *state;
    add_user(f, "t1", "alice", "clinician");
    fm_user u;
    int64_t retry;
    double known = 1e9, unknown = 1e9;
    for (int i = 0; i < 3; i++) {
        char addr[32];
        snprintf(addr, sizeof addr, "10.1.0.%d", i);
        uint64_t t0 = fm_mono_ns();
        assert_int_equal(fm_auth_login(f->st, "t1", "alice", PW2, addr, T0, &u, &retry),
                         FM_EPERM);
        double a = ms_since(t0);
        t0 = fm_mono_ns();
        assert_int_equal(fm_auth_login(f->st, "t1", "nobody", PW2, addr, T0, &u, &retry),
                         FM_EPERM);
        double b = ms_since(t0);
        known = a < known ? a : known;
        unknown = b < unknown ? b : unknown;
    }
    print_message("wrong password %.1f ms, unknown user %.1f ms\n", known, unknown);
    assert_true(unknown * 4 > known);
}

static int login(fx *f, const char *user, const char *pw, const char *addr, int64_t now,
                 int64_t *retry)
{
    fm_user u;
    return fm_auth_login(f->st, "t1", user, pw, addr, now, &u, retry);
}

static void test_throttle_account(void **state)
{
    fx *f = *state;
    add_user(f, "t1", "alice", "clinician");
    int64_t retry, now = T0;
    /* Five free failures, each from another address (account counter only). */
    char addr[32];
    for (int i = 1; i <= 5; i++) {
        snprintf(addr, sizeof addr, "10.2.0.%d", i);
        assert_int_equal(login(f, "alice", PW2, addr, now, &retry), FM_EPERM);
        assert_int_equal(retry, 0);
    }
    /* The sixth failure locks for 1 s, then 2, 4, 8, ... */
    assert_int_equal(login(f, "alice", PW2, "10.2.1.1", now, &retry), FM_EPERM);
    assert_int_equal(retry, 1);
    assert_int_equal(login(f, "alice", PW, "10.2.1.2", now + 500, &retry), FM_EBUSY);
    assert_int_equal(retry, 1);
    /* Attempts while locked are not counted: the next lock is still 2 s. */
    now += 1000;
    assert_int_equal(login(f, "alice", PW2, "10.2.1.3", now, &retry), FM_EPERM);
    assert_int_equal(retry, 2);
    assert_int_equal(login(f, "alice", PW2, "10.2.1.4", now + 1999, &retry), FM_EBUSY);
    assert_int_equal(retry, 1);
    now += 2000;
    assert_int_equal(login(f, "alice", PW2, "10.2.1.5", now, &retry), FM_EPERM);
    assert_int_equal(retry, 4);
    /* The lock survives a restart of the service (it is in the store). */
    fm_store_close(f->st);
    fm_errbuf err;
    assert_int_equal(fm_store_open(&f->cfg, &f->st, &err), 0);
    assert_int_equal(login(f, "alice", PW, "10.2.1.6", now + 3000, &retry), FM_EBUSY);
    assert_int_equal(retry, 1);
    /* Keep failing: the delay doubles up to the 15-minute cap, no further. */
    int64_t expect = 8;
    for (int i = 0; i < 9; i++) {
        now += 1000 * (expect / 2 > 0 ? expect / 2 : 1);
        assert_int_equal(login(f, "alice", PW2, "10.2.2.1", now, &retry), FM_EPERM);
        assert_int_equal(retry, expect < 900 ? expect : 900);
        expect *= 2;
    }
    assert_int_equal(retry, 900);
    assert_int_equal(login(f, "alice", PW, "10.2.2.2", now + 899000, &retry), FM_EBUSY);
    /* The lock always expires, and success resets the account counter. */
    now += 900000;
    assert_int_equal(login(f, "alice", PW, "10.2.3.1", now, &retry), 0);
    assert_int_equal(login(f, "alice", PW2, "10.2.3.2", now, &retry), FM_EPERM);
    assert_int_equal(retry, 0);
}

static void test_throttle_address(void **state)
{
    fx *f = *state;
    add_user(f, "t1", "alice", "clinician");
    int64_t retry, now = T0;
    /* One address guessing at many accounts (existing or not): it gets
     * FM_THROTTLE_ADDR_FACTOR times an account's free failures (shared
     * NATs), then waits like an account does. */
    int free_addr = 5 * FM_THROTTLE_ADDR_FACTOR;
    char name[16];
    for (int i = 0; i <= free_addr; i++) {
        snprintf(name, sizeof name, "u%d", i);
        assert_int_equal(login(f, name, PW2, "192.0.2.7", now, &retry), FM_EPERM);
        assert_int_equal(retry, i < free_addr ? 0 : 1);
    }
    /* That address now waits, even with a valid account and password... */
    assert_int_equal(login(f, "alice", PW, "192.0.2.7", now + 10, &retry), FM_EBUSY);
    /* ...while alice from elsewhere is not affected. */
    assert_int_equal(login(f, "alice", PW, "198.51.100.1", now + 10, &retry), 0);
    /* A success does not reset the address: its next failure locks longer. */
    now += 1000;
    assert_int_equal(login(f, "alice", PW, "192.0.2.7", now, &retry), 0);
    assert_int_equal(login(f, "v1", PW2, "192.0.2.7", now, &retry), FM_EPERM);
    assert_int_equal(retry, 2);
    /* After a quiet day the counters start over. */
    now += 86400000LL + 5000;
    assert_int_equal(login(f, "v2", PW2, "192.0.2.7", now, &retry), FM_EPERM);
    assert_int_equal(retry, 0);
    assert_int_equal(fm_auth_housekeeping(f->st, NULL, now + 2 * 86400000LL), 0);
}

/* ---- roles ------------------------------------------------------------------------ */

static void test_roles(void **state)
{
    (void)state;
    unsigned m;
    assert_int_equal(fm_auth_roles_parse("admin", &m), 0);
    assert_int_equal(m, FM_ROLE_ADMIN);
    assert_int_equal(fm_auth_roles_parse("operator,clinician", &m), 0);
    assert_int_equal(m, FM_ROLE_OPERATOR | FM_ROLE_CLINICIAN);
    char out[128];
    assert_int_equal(fm_auth_roles_format(m, out, sizeof out), 0);
    assert_string_equal(out, "clinician,operator");
    const char *bad[] = {"", "Admin", "root", "admin,", ",admin", "admin,,clinician",
                         "admin,admin", "admin clinician"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(fm_auth_roles_parse(bad[i], &m), FM_EINVAL);
    assert_int_equal(fm_auth_roles_format(FM_ROLE_ADMIN | FM_ROLE_DATA_SCIENTIST, out, 8),
                     FM_ERANGE);

    /* The table of auth.h, cell by cell: A C D M O. */
    static const struct {
        const char *action;
        const char *who; /* A admin, C clinician, D data_scientist, M device_manager, O op */
    } table[] = {
        {"users.manage", "A...O"},      {"devices.read", "ACDMO"},
        {"devices.manage", "A..MO"},    {"templates.manage", "A...O"},
        {"measurements.read", ".CD.O"}, {"labels.write", ".C..."},
        {"models.predict", ".CD.O"},    {"models.manage", "..D.O"},
        {"data.export", "..D.O"},       {"audit.read", "A...O"},
        {"models.read", "ACD.O"},       {"models.approve", "A.D.O"},
        {"models.deploy", "A.D.O"},     {"rules.manage", "A.D.O"},
    };
    const unsigned roles[] = {FM_ROLE_ADMIN, FM_ROLE_CLINICIAN, FM_ROLE_DATA_SCIENTIST,
                              FM_ROLE_DEVICE_MANAGER, FM_ROLE_OPERATOR};
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        for (size_t r = 0; r < 5; r++)
            if (fm_auth_allowed(roles[r], table[i].action) != (table[i].who[r] != '.'))
                fail_msg("%s for role %zu", table[i].action, r);
    /* Deny by default. */
    assert_false(fm_auth_allowed(0xff, "users.delete_everything"));
    assert_false(fm_auth_allowed(0xff, NULL));
    assert_false(fm_auth_allowed(0, "devices.read"));
    assert_false(fm_auth_allowed(FM_ROLE_ADMIN, "Users.Manage"));
    assert_true(fm_auth_allowed(FM_ROLE_DEVICE_MANAGER | FM_ROLE_CLINICIAN, "labels.write"));

    fm_principal p = {.user_id = 1, .tenant = "t1", .role_mask = FM_ROLE_ADMIN};
    assert_true(fm_auth_tenant_allowed(&p, "t1"));
    assert_false(fm_auth_tenant_allowed(&p, "t2"));
    p.role_mask |= FM_ROLE_OPERATOR;
    assert_true(fm_auth_tenant_allowed(&p, "t2"));
}

/* ---- base64url and JWT ------------------------------------------------------------- */

static void test_b64url(void **state)
{
    (void)state;
    unsigned char in[16], back[16];
    char enc[32];
    for (size_t n = 0; n <= sizeof in; n++) {
        for (size_t i = 0; i < n; i++)
            in[i] = (unsigned char)(0xf8 + i * 37);
        size_t len = fm_b64url_encode(in, n, enc);
        assert_int_equal(len, strlen(enc));
        assert_null(strpbrk(enc, "+/="));
        assert_int_equal(fm_b64url_decode(enc, len, back, sizeof back), (long)n);
        assert_memory_equal(in, back, n);
    }
    assert_int_equal(fm_b64url_decode("QQ", 2, back, sizeof back), 1);
    assert_int_equal(fm_b64url_decode("QR", 2, back, sizeof back), -1); /* stray bits */
    assert_int_equal(fm_b64url_decode("QQ==", 4, back, sizeof back), -1); /* padding */
    assert_int_equal(fm_b64url_decode("a+b/", 4, back, sizeof back), -1); /* std alphabet */
    assert_int_equal(fm_b64url_decode("Q", 1, back, sizeof back), -1);
    assert_int_equal(fm_b64url_decode("QUJD RA", 7, back, sizeof back), -1);
    assert_int_equal(fm_b64url_decode("QUJDRA", 6, back, 3), -1); /* does not fit */
}

static fm_token_claims claims(int64_t now_s)
{
    fm_token_claims c = {.sub = 7, .tenant = "t1", .roles = "clinician,operator",
                         .iat = now_s, .exp = now_s + 900, .jti = "jti-1", .epoch = 3,
                         .sid = "sid-1"};
    return c;
}

/* Signs header.payload (given as JSON text) with an arbitrary EC key, in
 * JOSE form, independently of tokens.c. */
static char *forge(EVP_PKEY *pkey, const char *header, const char *payload, int der_sig)
{
    char h[1024], p[2048], sigtxt[256];
    fm_b64url_encode((const unsigned char *)header, strlen(header), h);
    fm_b64url_encode((const unsigned char *)payload, strlen(payload), p);
    char input[4096];
    snprintf(input, sizeof input, "%s.%s", h, p);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    unsigned char der[128];
    size_t der_len = sizeof der;
    assert_int_equal(EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, pkey), 1);
    assert_int_equal(EVP_DigestSign(ctx, der, &der_len, (unsigned char *)input, strlen(input)),
                     1);
    EVP_MD_CTX_free(ctx);
    if (der_sig) {
        fm_b64url_encode(der, der_len, sigtxt);
    } else {
        const unsigned char *q = der;
        ECDSA_SIG *sig = d2i_ECDSA_SIG(NULL, &q, (long)der_len);
        unsigned char rs[64];
        BN_bn2binpad(ECDSA_SIG_get0_r(sig), rs, 32);
        BN_bn2binpad(ECDSA_SIG_get0_s(sig), rs + 32, 32);
        ECDSA_SIG_free(sig);
        fm_b64url_encode(rs, 64, sigtxt);
    }
    char *tok = malloc(strlen(input) + strlen(sigtxt) + 2);
    sprintf(tok, "%s.%s", input, sigtxt);
    return tok;
}

static EVP_PKEY *load_pkey(const char *path)
{
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    EVP_PKEY *k = PEM_read_PrivateKey(fp, NULL, NULL, NULL);
    fclose(fp);
    assert_non_null(k);
    return k;
}

#define PAYLOAD_FMT                                                                                \
    "{\"sub\":\"7\",\"tenant\":\"t1\",\"roles\":[\"clinician\"],\"iat\":%lld,\"exp\":%lld,"       \
    "\"jti\":\"j\",\"epoch\":0,\"sid\":\"s\"}"

static void test_jwt_roundtrip(void **state)
{
    fx *f = *state;
    int64_t now = T0 / 1000;
    fm_token_claims c = claims(now), got;
    char *tok = NULL;
    assert_int_equal(fm_jwt_sign(f->key, &c, &tok), 0);
    assert_int_equal(fm_jwt_verify(f->key, tok, now, &got), 0);
    assert_int_equal(got.sub, 7);
    assert_string_equal(got.tenant, "t1");
    assert_string_equal(got.roles, "clinician,operator");
    assert_int_equal(got.iat, now);
    assert_int_equal(got.exp, now + 900);
    assert_string_equal(got.jti, "jti-1");
    assert_int_equal(got.epoch, 3);
    assert_string_equal(got.sid, "sid-1");
    /* The header is exactly what the design says. */
    char hdr[256];
    unsigned char raw[256];
    long n = fm_b64url_decode(tok, (size_t)(strchr(tok, '.') - tok), raw, sizeof raw - 1);
    assert_true(n > 0);
    raw[n] = '\0';
    snprintf(hdr, sizeof hdr, "{\"alg\":\"ES256\",\"typ\":\"JWT\",\"kid\":\"%s\"}",
             fm_jwt_key_id(f->key));
    assert_string_equal((char *)raw, hdr);
    assert_int_equal(strlen(fm_jwt_key_id(f->key)), 22);
    /* Times: skew allowed, then refused. */
    assert_int_equal(fm_jwt_verify(f->key, tok, now - FM_JWT_SKEW_S, &got), 0);
    assert_int_equal(fm_jwt_verify(f->key, tok, now - FM_JWT_SKEW_S - 1, &got), FM_EPERM);
    assert_int_equal(fm_jwt_verify(f->key, tok, now + 900 + FM_JWT_SKEW_S - 1, &got), 0);
    assert_int_equal(fm_jwt_verify(f->key, tok, now + 900 + FM_JWT_SKEW_S, &got), FM_EPERM);
    fm_free(tok);
    /* Bad claims are not signed. */
    c.roles[0] = '\0';
    assert_int_equal(fm_jwt_sign(f->key, &c, &tok), FM_EINVAL);
}

static void test_jwt_refusals(void **state)
{
    fx *f = *state;
    int64_t now = T0 / 1000;
    fm_token_claims c = claims(now), got;
    char *tok = NULL;
    assert_int_equal(fm_jwt_sign(f->key, &c, &tok), 0);
    char *d1 = strchr(tok, '.'), *d2 = strrchr(tok, '.');

    /* Tampered payload (tenant t1 -> t2) under the original signature. */
    char payload[1024];
    unsigned char raw[1024];
    long n = fm_b64url_decode(d1 + 1, (size_t)(d2 - d1 - 1), raw, sizeof raw - 1);
    raw[n] = '\0';
    char *t = strstr((char *)raw, "\"t1\"");
    assert_non_null(t);
    t[2] = '2';
    fm_b64url_encode(raw, (size_t)n, payload);
    char forged[4096];
    snprintf(forged, sizeof forged, "%.*s.%s%s", (int)(d1 - tok), tok, payload, d2);
    assert_int_equal(fm_jwt_verify(f->key, forged, now, &got), FM_EPERM);

    /* Tampered signature: every position. */
    size_t siglen = strlen(d2 + 1);
    for (size_t i = 0; i < siglen; i++) {
        snprintf(forged, sizeof forged, "%s", tok);
        char *p = forged + (d2 + 1 - tok) + i;
        *p = *p == 'A' ? 'B' : 'A';
        assert_int_equal(fm_jwt_verify(f->key, forged, now, &got), FM_EPERM);
    }
    /* Structure: truncated, extra segment, empty signature, padding, junk. */
    snprintf(forged, sizeof forged, "%.*s", (int)(d2 - tok), tok);
    assert_int_equal(fm_jwt_verify(f->key, forged, now, &got), FM_EPERM);
    snprintf(forged, sizeof forged, "%.*s.", (int)(d2 - tok), tok);
    assert_int_equal(fm_jwt_verify(f->key, forged, now, &got), FM_EPERM);
    snprintf(forged, sizeof forged, "%s.x", tok);
    assert_int_equal(fm_jwt_verify(f->key, forged, now, &got), FM_EPERM);
    snprintf(forged, sizeof forged, "%s=", tok);
    assert_int_equal(fm_jwt_verify(f->key, forged, now, &got), FM_EPERM);
    snprintf(forged, sizeof forged, " %s", tok);
    assert_int_equal(fm_jwt_verify(f->key, forged, now, &got), FM_EPERM);
    assert_int_equal(fm_jwt_verify(f->key, "", now, &got), FM_EPERM);
    assert_int_equal(fm_jwt_verify(f->key, "..", now, &got), FM_EPERM);
    fm_free(tok);

    /* Headers other than ours, each with a genuine signature by our key. */
    EVP_PKEY *ours = load_pkey(f->key_path);
    char pl[512], hdr[256];
    snprintf(pl, sizeof pl, PAYLOAD_FMT, (long long)now, (long long)now + 600);
    const char *kid = fm_jwt_key_id(f->key);
    snprintf(hdr, sizeof hdr, "{\"alg\":\"ES256\",\"typ\":\"JWT\",\"kid\":\"%s\"}", kid);
    char *ok = forge(ours, hdr, pl, 0);
    assert_int_equal(fm_jwt_verify(f->key, ok, now, &got), 0); /* the control */
    free(ok);
    /* A DER signature (what OpenSSL emits raw) is not JOSE. */
    char *der = forge(ours, hdr, pl, 1);
    assert_int_equal(fm_jwt_verify(f->key, der, now, &got), FM_EPERM);
    free(der);
    const char *bad_headers[] = {
        "{\"alg\":\"ES384\",\"typ\":\"JWT\",\"kid\":\"%s\"}",
        "{\"alg\":\"es256\",\"typ\":\"JWT\",\"kid\":\"%s\"}",
        "{\"alg\":\"ES256\",\"typ\":\"JWT\",\"kid\":\"%s-other\"}",
        "{\"alg\":\"ES256\",\"typ\":\"JWT\"}%s",
        "{\"alg\":\"ES256\",\"typ\":\"JWS\",\"kid\":\"%s\"}",
        "{\"alg\":\"ES256\",\"kid\":\"%s\",\"crit\":[\"exp\"]}",
        "{\"alg\":\"ES256\",\"kid\":\"%s\",\"jku\":\"https://evil.example/jwks\"}",
        "{\"alg\":\"ES256\",\"alg\":\"ES256\",\"kid\":\"%s\"}",
        "[\"ES256\",\"%s\"]",
    };
    for (size_t i = 0; i < sizeof bad_headers / sizeof bad_headers[0]; i++) {
        snprintf(hdr, sizeof hdr, bad_headers[i], kid);
        char *x = forge(ours, hdr, pl, 0);
        if (fm_jwt_verify(f->key, x, now, &got) != FM_EPERM)
            fail_msg("header accepted: %s", hdr);
        free(x);
    }
    /* Payloads that are signed but not what fleetml mints. */
    const char *bad_payloads[] = {
        "{\"sub\":7,\"tenant\":\"t1\",\"roles\":[\"clinician\"],\"iat\":%lld,\"exp\":%lld,"
        "\"jti\":\"j\",\"epoch\":0}",
        "{\"sub\":\"7\",\"tenant\":\"t1\",\"roles\":[\"root\"],\"iat\":%lld,\"exp\":%lld,"
        "\"jti\":\"j\",\"epoch\":0}",
        "{\"sub\":\"7\",\"tenant\":\"t1\",\"roles\":\"clinician\",\"iat\":%lld,\"exp\":%lld,"
        "\"jti\":\"j\",\"epoch\":0}",
        "{\"sub\":\"7\",\"sub\":\"8\",\"tenant\":\"t1\",\"roles\":[\"clinician\"],\"iat\":%lld,"
        "\"exp\":%lld,\"jti\":\"j\",\"epoch\":0}",
        "{\"sub\":\"07\",\"tenant\":\"t1\",\"roles\":[\"clinician\"],\"iat\":%lld,\"exp\":%lld,"
        "\"jti\":\"j\",\"epoch\":0}",
    };
    snprintf(hdr, sizeof hdr, "{\"alg\":\"ES256\",\"typ\":\"JWT\",\"kid\":\"%s\"}", kid);
    for (size_t i = 0; i < sizeof bad_payloads / sizeof bad_payloads[0]; i++) {
        snprintf(pl, sizeof pl, bad_payloads[i], (long long)now, (long long)now + 600);
        char *x = forge(ours, hdr, pl, 0);
        if (fm_jwt_verify(f->key, x, now, &got) != FM_EPERM)
            fail_msg("payload accepted: %s", pl);
        free(x);
    }
    /* A lifetime over a day, and an iat in the future. */
    snprintf(pl, sizeof pl, PAYLOAD_FMT, (long long)now, (long long)now + 86401);
    char *x = forge(ours, hdr, pl, 0);
    assert_int_equal(fm_jwt_verify(f->key, x, now, &got), FM_EPERM);
    free(x);
    snprintf(pl, sizeof pl, PAYLOAD_FMT, (long long)now + 120, (long long)now + 600);
    x = forge(ours, hdr, pl, 0);
    assert_int_equal(fm_jwt_verify(f->key, x, now, &got), FM_EPERM);
    free(x);
    EVP_PKEY_free(ours);

    /* alg "none" with an empty signature, and with none at all. */
    snprintf(pl, sizeof pl, PAYLOAD_FMT, (long long)now, (long long)now + 600);
    snprintf(hdr, sizeof hdr, "{\"alg\":\"none\",\"typ\":\"JWT\",\"kid\":\"%s\"}", kid);
    char h64[512], p64[1024];
    fm_b64url_encode((unsigned char *)hdr, strlen(hdr), h64);
    fm_b64url_encode((unsigned char *)pl, strlen(pl), p64);
    snprintf(forged, sizeof forged, "%s.%s.", h64, p64);
    assert_int_equal(fm_jwt_verify(f->key, forged, now, &got), FM_EPERM);
    snprintf(forged, sizeof forged, "%s.%s", h64, p64);
    assert_int_equal(fm_jwt_verify(f->key, forged, now, &got), FM_EPERM);

    /* HS256 keyed with the public key (the classic algorithm confusion). */
    snprintf(hdr, sizeof hdr, "{\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":\"%s\"}", kid);
    fm_b64url_encode((unsigned char *)hdr, strlen(hdr), h64);
    char input[2048];
    snprintf(input, sizeof input, "%s.%s", h64, p64);
    EVP_PKEY *pk = load_pkey(f->key_path);
    unsigned char *spki = NULL;
    int spki_len = i2d_PUBKEY(pk, &spki);
    unsigned char mac[32];
    unsigned int mac_len = 0;
    HMAC(EVP_sha256(), spki, spki_len, (unsigned char *)input, strlen(input), mac, &mac_len);
    OPENSSL_free(spki);
    EVP_PKEY_free(pk);
    char m64[64];
    fm_b64url_encode(mac, mac_len, m64);
    snprintf(forged, sizeof forged, "%s.%s", input, m64);
    assert_int_equal(fm_jwt_verify(f->key, forged, now, &got), FM_EPERM);
}

static void test_jwt_wrong_key(void **state)
{
    fx *f = *state;
    char other_path[160];
    fm_errbuf err;
    snprintf(other_path, sizeof other_path, "%s/other.key", f->dir);
    assert_int_equal(fm_jwt_key_create(other_path, &err), 0);
    assert_int_equal(fm_jwt_key_create(other_path, &err), FM_EEXIST);
    fm_jwt_key *other;
    assert_int_equal(fm_jwt_key_load(other_path, &other, &err), 0);
    assert_string_not_equal(fm_jwt_key_id(other), fm_jwt_key_id(f->key));
    int64_t now = T0 / 1000;
    fm_token_claims c = claims(now), got;
    char *tok;
    assert_int_equal(fm_jwt_sign(other, &c, &tok), 0);
    assert_int_equal(fm_jwt_verify(f->key, tok, now, &got), FM_EPERM); /* kid differs */
    fm_free(tok);
    /* The other key claiming our kid: the signature check catches it. */
    EVP_PKEY *pk = load_pkey(other_path);
    char hdr[256], pl[512];
    snprintf(hdr, sizeof hdr, "{\"alg\":\"ES256\",\"typ\":\"JWT\",\"kid\":\"%s\"}",
             fm_jwt_key_id(f->key));
    snprintf(pl, sizeof pl, PAYLOAD_FMT, (long long)now, (long long)now + 600);
    char *x = forge(pk, hdr, pl, 0);
    assert_int_equal(fm_jwt_verify(f->key, x, now, &got), FM_EPERM);
    free(x);
    EVP_PKEY_free(pk);
    fm_jwt_key_free(other);
    /* Key files must be private. */
    struct stat sb;
    assert_int_equal(stat(f->key_path, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0600);
    assert_int_equal(chmod(other_path, 0644), 0);
    assert_int_equal(fm_jwt_key_load(other_path, &other, &err), FM_EPERM);
    assert_null(other);
    assert_int_equal(fm_jwt_key_load("/nonexistent/jwt.key", &other, &err), FM_ENOTFOUND);
}

/* ---- sessions ----------------------------------------------------------------------- */

static fm_user signin(fx *f, const char *name, int64_t now)
{
    fm_user u;
    int64_t retry;
    assert_int_equal(fm_auth_login(f->st, "t1", name, PW, "", now, &u, &retry), 0);
    return u;
}

static int access_ok(fx *f, const char *token, int64_t now_ms)
{
    fm_principal p;
    return fm_auth_verify_access(f->st, f->key, token, now_ms, &p);
}

static void test_session_and_epoch(void **state)
{
    fx *f = *state;
    add_user(f, "t1", "alice", "clinician");
    fm_user u = signin(f, "alice", T0);
    fm_token_pair a;
    assert_int_equal(fm_auth_session_start(f->st, f->key, &u, T0, NULL, &a), 0);
    assert_int_equal(a.expires_in, FM_ACCESS_TTL_S);
    assert_int_equal(strlen(a.refresh_token), 43);
    fm_principal p;
    assert_int_equal(fm_auth_verify_access(f->st, f->key, a.access_token, T0 + 1000, &p), 0);
    assert_int_equal(p.user_id, u.id);
    assert_string_equal(p.tenant, "t1");
    assert_string_equal(p.username, "alice");
    assert_int_equal(p.role_mask, FM_ROLE_CLINICIAN);
    assert_true(fm_auth_allowed(p.role_mask, "labels.write"));
    assert_true(fm_auth_tenant_allowed(&p, "t1"));
    assert_false(fm_auth_tenant_allowed(&p, "t2"));
    /* Expired after 15 minutes (+ skew). */
    assert_int_equal(access_ok(f, a.access_token, T0 + (900 + FM_JWT_SKEW_S) * 1000LL),
                     FM_EPERM);
    /* A role change bumps the epoch: the old token (old roles) dies. */
    fm_errbuf err;
    assert_int_equal(fm_auth_user_set_roles(f->st, "t1", "alice", "clinician,admin", &err), 0);
    assert_int_equal(access_ok(f, a.access_token, T0 + 2000), FM_EPERM);
    /* ...but the refresh token still works and carries the new roles. */
    fm_token_pair b;
    assert_int_equal(fm_auth_refresh(f->st, f->key, a.refresh_token, T0 + 3000, NULL, &b, NULL,
                                     NULL),
                     0);
    assert_int_equal(fm_auth_verify_access(f->st, f->key, b.access_token, T0 + 3000, &p), 0);
    assert_int_equal(p.role_mask, FM_ROLE_CLINICIAN | FM_ROLE_ADMIN);
    /* A token signed for another tenant than the user's is refused. */
    fm_token_claims c = {.sub = u.id, .tenant = "t2", .roles = "admin", .iat = T0 / 1000,
                         .exp = T0 / 1000 + 600, .jti = "x", .epoch = u.epoch + 1};
    snprintf(c.sid, sizeof c.sid, "%s", p.sid);
    char *tok;
    assert_int_equal(fm_jwt_sign(f->key, &c, &tok), 0);
    assert_int_equal(access_ok(f, tok, T0 + 3000), FM_EPERM);
    fm_free(tok);
    /* And one with no session id (not minted by a sign-in). */
    snprintf(c.tenant, sizeof c.tenant, "t1");
    c.sid[0] = '\0';
    assert_int_equal(fm_jwt_sign(f->key, &c, &tok), 0);
    assert_int_equal(access_ok(f, tok, T0 + 3000), FM_EPERM);
    fm_free(tok);
    /* Unknown user id. */
    snprintf(c.sid, sizeof c.sid, "%s", p.sid);
    c.sub = 9999;
    assert_int_equal(fm_jwt_sign(f->key, &c, &tok), 0);
    assert_int_equal(access_ok(f, tok, T0 + 3000), FM_EPERM);
    fm_free(tok);
    fm_token_pair_clear(&a);
    fm_token_pair_clear(&b);
}


/* ---- second factor (TOTP) ------------------------------------------------------ */

/* RFC 6238 appendix B, SHA-1, 8 digits, key "12345678901234567890". */
static void test_totp_rfc6238_vectors(void **state)
{
    (void)state;
    const unsigned char key[] = "12345678901234567890";
    const struct {
        uint64_t t;
        uint32_t code;
    } v[] = {{59, 94287082},         {1111111109, 7081804}, {1111111111, 14050471},
             {1234567890, 89005924}, {2000000000, 69279037}, {20000000000ULL, 65353130}};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        uint32_t got = 0;
        assert_int_equal(fm_totp_code(key, 20, v[i].t / 30, 8, &got), 0);
        assert_int_equal(got, v[i].code);
    }
    uint32_t six;
    assert_int_equal(fm_totp_code(key, 20, 59 / 30, 6, &six), 0);
    assert_int_equal(six, 287082);
    assert_int_equal(fm_totp_code(key, 20, 1, 5, &six), FM_EINVAL);
    assert_int_equal(fm_totp_code(key, 0, 1, 6, &six), FM_EINVAL);
}

static void totp_now(const unsigned char *key, int64_t ms, int delta, char out[8])
{
    uint32_t c;
    assert_int_equal(fm_totp_code(key, 20, (uint64_t)(ms / 30000 + delta), 6, &c), 0);
    snprintf(out, 8, "%06u", c);
}

static void test_totp_verify_window_and_replay(void **state)
{
    (void)state;
    const unsigned char key[] = "12345678901234567890";
    int64_t now = T0 + 12345, step = 0;
    char code[8];
    for (int d = -1; d <= 1; d++) {
        totp_now(key, now, d, code);
        assert_int_equal(fm_totp_verify(key, 20, code, now, 0, &step), 0);
        assert_int_equal(step, now / 30000 + d);
        /* Not again once that step is used. */
        assert_int_equal(fm_totp_verify(key, 20, code, now, step, NULL), FM_EPERM);
    }
    totp_now(key, now, 2, code);
    assert_int_equal(fm_totp_verify(key, 20, code, now, 0, NULL), FM_EPERM);
    totp_now(key, now, -2, code);
    assert_int_equal(fm_totp_verify(key, 20, code, now, 0, NULL), FM_EPERM);
    const char *bad[] = {"", "12345", "1234567", "12345a", " 12345", NULL};
    for (int i = 0; bad[i]; i++)
        assert_int_equal(fm_totp_verify(key, 20, bad[i], now, 0, NULL), FM_EPERM);
    assert_int_equal(fm_totp_verify(key, 20, NULL, now, 0, NULL), FM_EPERM);
    char b32[64];
    assert_int_equal(fm_base32_encode((const unsigned char *)"foobar", 6, b32, sizeof b32), 10);
    assert_string_equal(b32, "MZXW6YTBOI"); /* RFC 4648 section 10, unpadded */
    assert_int_equal(fm_base32_encode((const unsigned char *)"foobar", 6, b32, 10), 0);
}

/* Sign-in with a confirmed second factor: no code -> FM_ESTATE (and not
 * counted), wrong or replayed code -> FM_EPERM (counted), right -> 0. An
 * unconfirmed enrolment is not required yet. */
static void test_login_with_totp(void **state)
{
    fx *f = *state;
    add_user(f, "t1", "alice", "clinician");
    fm_user u = signin(f, "alice", T0);
    unsigned char secret[FM_TOTP_SECRET_LEN];
    assert_int_equal(fm_totp_new_secret(secret, sizeof secret), 0);
    fm_errbuf err;
    assert_int_equal(fm_store_totp_set(f->st, u.id, secret, sizeof secret, T0, &err), 0);
    fm_user got;
    int64_t retry, now = T0 + 1000;
    /* Enrolling, not confirmed: a password is still enough. */
    assert_int_equal(fm_auth_login_ex(f->st, NULL, "t1", "alice", PW, NULL, "", now, &got, &retry),
                     0);
    char code[8];
    totp_now(secret, now, 0, code);
    int64_t step = now / 30000;
    assert_int_equal(fm_store_totp_use(f->st, u.id, step, 1, &err), 0); /* confirm */
    /* A second enrolment cannot replace a confirmed one. */
    assert_int_equal(fm_store_totp_set(f->st, u.id, secret, sizeof secret, now, &err), FM_EEXIST);

    now += 30000;
    for (int i = 0; i < 8; i++) /* no code: never counted, never locked */
        assert_int_equal(
            fm_auth_login_ex(f->st, NULL, "t1", "alice", PW, NULL, "", now, &got, &retry),
            FM_ESTATE);
    assert_int_equal(fm_auth_login_ex(f->st, NULL, "t1", "alice", PW2, NULL, "", now, &got, &retry),
                     FM_EPERM); /* wrong password stays a plain failure */
    totp_now(secret, now, 0, code);
    assert_int_equal(fm_auth_login_ex(f->st, NULL, "t1", "alice", PW, code, "", now, &got, &retry),
                     0);
    assert_int_equal(got.id, u.id);
    assert_int_equal(got.second_factor, 1);
    /* The session keeps it, through a refresh too; a password-only
     * session (from before the factor was confirmed) does not have it. */
    fm_token_pair pair, renewed, plain;
    fm_principal who;
    assert_int_equal(fm_auth_session_start(f->st, f->key, &got, now, NULL, &pair), 0);
    assert_int_equal(fm_auth_verify_access(f->st, f->key, pair.access_token, now, &who), 0);
    assert_int_equal(who.second_factor, 1);
    assert_int_equal(fm_auth_refresh(f->st, f->key, pair.refresh_token, now + 1000, NULL,
                                     &renewed, NULL, NULL),
                     0);
    assert_int_equal(fm_auth_verify_access(f->st, f->key, renewed.access_token, now + 1000, &who),
                     0);
    assert_int_equal(who.second_factor, 1);
    assert_int_equal(fm_auth_session_start(f->st, f->key, &u, now, NULL, &plain), 0);
    assert_int_equal(fm_auth_verify_access(f->st, f->key, plain.access_token, now, &who), 0);
    assert_int_equal(who.second_factor, 0);
    fm_token_pair_clear(&pair);
    fm_token_pair_clear(&renewed);
    fm_token_pair_clear(&plain);
    /* The same code again (replay) is a failure. */
    assert_int_equal(fm_auth_login_ex(f->st, NULL, "t1", "alice", PW, code, "", now, &got, &retry),
                     FM_EPERM);
    /* Wrong codes count: the account locks after the free failures. */
    int locked = 0;
    for (int i = 0; i < 8 && !locked; i++) {
        int rc = fm_auth_login_ex(f->st, NULL, "t1", "alice", PW, "000000", "", now, &got,
                                  &retry);
        assert_true(rc == FM_EPERM || rc == FM_EBUSY);
        locked = rc == FM_EBUSY;
    }
    assert_true(locked);
    /* Removing the factor: the password alone works again (after the lock). */
    assert_int_equal(fm_store_totp_delete(f->st, u.id, &err), 0);
    assert_int_equal(fm_store_totp_get(f->st, u.id, &(fm_totp){0}), FM_ENOTFOUND);
    now += 3600 * 1000LL;
    assert_int_equal(fm_auth_login_ex(f->st, NULL, "t1", "alice", PW, NULL, "", now, &got, &retry),
                     0);
}

/* Renewing does not extend a session: its last refresh token expires one
 * refresh lifetime after the sign-in, however often it was used. */
static void test_refresh_session_lifetime_is_absolute(void **state)
{
    fx *f = *state;
    add_user(f, "t1", "alice", "clinician");
    fm_user u = signin(f, "alice", T0);
    fm_token_params tp = {.access_ttl_s = 900, .refresh_ttl_s = 3600};
    fm_token_pair cur, next;
    assert_int_equal(fm_auth_session_start(f->st, f->key, &u, T0, &tp, &cur), 0);
    int64_t t = T0;
    for (int i = 0; i < 5; i++) { /* renewed every 10 minutes */
        t += 600 * 1000LL;
        assert_int_equal(fm_auth_refresh(f->st, f->key, cur.refresh_token, t, &tp, &next, NULL,
                                         NULL),
                         0);
        fm_token_pair_clear(&cur);
        cur = next;
    }
    /* 50 minutes in: fine until the hour is up, not a second after. */
    fm_token_pair late;
    assert_int_equal(fm_auth_refresh(f->st, f->key, cur.refresh_token, T0 + 3600 * 1000LL, &tp,
                                     &late, NULL, NULL),
                     FM_EPERM);
    assert_null(late.access_token);
    fm_token_pair_clear(&cur);
}

static void test_refresh_rotation_and_reuse(void **state)
{
    fx *f = *state;
    add_user(f, "t1", "alice", "clinician");
    fm_user u = signin(f, "alice", T0);
    fm_token_pair a, b, c, d;
    assert_int_equal(fm_auth_session_start(f->st, f->key, &u, T0, NULL, &a), 0);
    int reuse = -1;
    fm_user who;
    assert_int_equal(fm_auth_refresh(f->st, f->key, a.refresh_token, T0 + 1000, NULL, &b, &who,
                                     &reuse),
                     0);
    assert_int_equal(reuse, 0);
    assert_int_equal(who.id, u.id);
    assert_string_not_equal(a.refresh_token, b.refresh_token);
    assert_int_equal(access_ok(f, b.access_token, T0 + 1000), 0);
    assert_int_equal(fm_auth_refresh(f->st, f->key, b.refresh_token, T0 + 2000, NULL, &c, NULL,
                                     &reuse),
                     0);
    /* The first token again: reuse. The whole family is revoked... */
    assert_int_equal(fm_auth_refresh(f->st, f->key, a.refresh_token, T0 + 3000, NULL, &d, NULL,
                                     &reuse),
                     FM_EPERM);
    assert_int_equal(reuse, 1);
    assert_null(d.access_token);
    /* ...including the newest refresh token and the session's access tokens. */
    assert_int_equal(fm_auth_refresh(f->st, f->key, c.refresh_token, T0 + 4000, NULL, &d, NULL,
                                     &reuse),
                     FM_EPERM);
    assert_int_equal(reuse, 0);
    assert_int_equal(access_ok(f, c.access_token, T0 + 4000), FM_EPERM);
    /* Nothing else was bumped: another session of alice is unaffected. */
    fm_token_pair e;
    assert_int_equal(fm_auth_session_start(f->st, f->key, &u, T0 + 5000, NULL, &e), 0);
    assert_int_equal(access_ok(f, e.access_token, T0 + 5000), 0);
    /* Junk and unknown tokens. */
    assert_int_equal(fm_auth_refresh(f->st, f->key, "nope", T0, NULL, &d, NULL, NULL), FM_EPERM);
    assert_int_equal(fm_auth_refresh(f->st, f->key, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                                     T0, NULL, &d, NULL, NULL),
                     FM_EPERM);
    /* Expiry (a short-lived refresh token for the test). */
    fm_token_params short_ttl = {.refresh_ttl_s = 60};
    fm_token_pair g;
    assert_int_equal(fm_auth_session_start(f->st, f->key, &u, T0, &short_ttl, &g), 0);
    assert_int_equal(fm_auth_refresh(f->st, f->key, g.refresh_token, T0 + 60000, NULL, &d, NULL,
                                     NULL),
                     FM_EPERM);
    long pruned = -1;
    assert_int_equal(fm_store_refresh_prune(f->st, T0 + 61000, &pruned), 0);
    assert_true(pruned >= 1);
    fm_token_pair *all[] = {&a, &b, &c, &e, &g};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        fm_token_pair_clear(all[i]);
}

static void test_logout(void **state)
{
    fx *f = *state;
    add_user(f, "t1", "alice", "clinician");
    fm_user u = signin(f, "alice", T0);
    fm_token_pair phone, laptop, x;
    assert_int_equal(fm_auth_session_start(f->st, f->key, &u, T0, NULL, &phone), 0);
    assert_int_equal(fm_auth_session_start(f->st, f->key, &u, T0, NULL, &laptop), 0);
    assert_int_equal(fm_auth_logout(f->st, phone.refresh_token, T0 + 1000, NULL), 0);
    assert_int_equal(fm_auth_logout(f->st, phone.refresh_token, T0 + 1000, NULL), 0); /* idempotent */
    assert_int_equal(fm_auth_logout(f->st, "garbage", T0 + 1000, NULL), 0);
    assert_int_equal(fm_auth_refresh(f->st, f->key, phone.refresh_token, T0 + 2000, NULL, &x,
                                     NULL, NULL),
                     FM_EPERM);
    assert_int_equal(access_ok(f, phone.access_token, T0 + 2000), FM_EPERM);
    assert_int_equal(access_ok(f, laptop.access_token, T0 + 2000), 0);
    /* Log out everywhere. */
    fm_errbuf err;
    assert_int_equal(fm_auth_logout_all(f->st, u.id, T0 + 3000, &err), 0);
    assert_int_equal(access_ok(f, laptop.access_token, T0 + 3000), FM_EPERM);
    assert_int_equal(fm_auth_refresh(f->st, f->key, laptop.refresh_token, T0 + 3000, NULL, &x,
                                     NULL, NULL),
                     FM_EPERM);
    /* A session cannot be started with the epoch seen before the revocation. */
    assert_int_equal(fm_auth_session_start(f->st, f->key, &u, T0 + 4000, NULL, &x), FM_EPERM);
    fm_token_pair_clear(&phone);
    fm_token_pair_clear(&laptop);
}

static void test_password_change_and_disable(void **state)
{
    fx *f = *state;
    add_user(f, "t1", "alice", "clinician");
    add_user(f, "t1", "bob", "admin");
    fm_user u = signin(f, "alice", T0), v = signin(f, "bob", T0);
    fm_token_pair a1, a2, b1, x;
    assert_int_equal(fm_auth_session_start(f->st, f->key, &u, T0, NULL, &a1), 0);
    assert_int_equal(fm_auth_session_start(f->st, f->key, &u, T0, NULL, &a2), 0);
    assert_int_equal(fm_auth_session_start(f->st, f->key, &v, T0, NULL, &b1), 0);
    fm_errbuf err;
    const char *why = NULL;
    assert_int_equal(fm_auth_set_password(f->st, "t1", "alice", "passwordpassword", &why, &err),
                     FM_EINVAL);
    assert_int_equal(fm_auth_set_password(f->st, "t1", "alice", PW2, &why, &err), 0);
    fm_token_pair *revoked[] = {&a1, &a2};
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(access_ok(f, revoked[i]->access_token, T0 + 1000), FM_EPERM);
        assert_int_equal(fm_auth_refresh(f->st, f->key, revoked[i]->refresh_token, T0 + 1000,
                                         NULL, &x, NULL, NULL),
                         FM_EPERM);
    }
    assert_int_equal(access_ok(f, b1.access_token, T0 + 1000), 0); /* other users untouched */
    fm_user w;
    int64_t retry;
    assert_int_equal(fm_auth_login(f->st, "t1", "alice", PW, "", T0 + 1000, &w, &retry),
                     FM_EPERM);
    assert_int_equal(fm_auth_login(f->st, "t1", "alice", PW2, "", T0 + 1000, &w, &retry), 0);
    /* Disabling bob ends his sessions at once. */
    assert_int_equal(fm_auth_user_set_status(f->st, "t1", "bob", FM_USER_DISABLED, &err), 0);
    assert_int_equal(access_ok(f, b1.access_token, T0 + 2000), FM_EPERM);
    assert_int_equal(fm_auth_refresh(f->st, f->key, b1.refresh_token, T0 + 2000, NULL, &x, NULL,
                                     NULL),
                     FM_EPERM);
    assert_int_equal(fm_auth_user_set_status(f->st, "t1", "nobody", FM_USER_DISABLED, &err),
                     FM_ENOTFOUND);
    fm_token_pair_clear(&a1);
    fm_token_pair_clear(&a2);
    fm_token_pair_clear(&b1);
}

static int count_user(void *ud, const fm_user *u)
{
    int *n = ud;
    assert_string_equal(u->password_hash, "");
    (*n)++;
    return 0;
}

static void test_user_list(void **state)
{
    fx *f = *state;
    add_user(f, "t1", "alice", "clinician");
    add_user(f, "t1", "bob", "admin");
    add_user(f, "t2", "carol", "operator");
    int n = 0;
    assert_int_equal(fm_store_user_list(f->st, "t1", count_user, &n), 0);
    assert_int_equal(n, 2);
    n = 0;
    assert_int_equal(fm_store_user_list(f->st, NULL, count_user, &n), 0);
    assert_int_equal(n, 3);
    assert_int_equal(fm_store_tenant_exists(f->st, "t2"), 1);
    assert_int_equal(fm_store_tenant_exists(f->st, "t3"), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_policy),
        cmocka_unit_test_setup_teardown(test_huge_password_fast, setup, teardown),
        cmocka_unit_test(test_common_list_in_sync),
        cmocka_unit_test(test_username_normalize),
        cmocka_unit_test_setup_teardown(test_login, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_enumeration_by_timing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_throttle_account, setup, teardown),
        cmocka_unit_test_setup_teardown(test_throttle_address, setup, teardown),
        cmocka_unit_test(test_roles),
        cmocka_unit_test(test_b64url),
        cmocka_unit_test_setup_teardown(test_jwt_roundtrip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_jwt_refusals, setup, teardown),
        cmocka_unit_test_setup_teardown(test_jwt_wrong_key, setup, teardown),
        cmocka_unit_test_setup_teardown(test_session_and_epoch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refresh_rotation_and_reuse, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refresh_session_lifetime_is_absolute, setup, teardown),
        cmocka_unit_test(test_totp_rfc6238_vectors),
        cmocka_unit_test(test_totp_verify_window_and_replay),
        cmocka_unit_test_setup_teardown(test_login_with_totp, setup, teardown),
        cmocka_unit_test_setup_teardown(test_logout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_password_change_and_disable, setup, teardown),
        cmocka_unit_test_setup_teardown(test_user_list, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
