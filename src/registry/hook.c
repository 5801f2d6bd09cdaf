/*
 * Pre-provisioning hooks: an operator's own check that decides whether a
 * device may be provisioned. Either an HTTP(S) endpoint (POST with a JSON
 * body, libcurl) or a local executable (JSON on stdin, JSON on stdout).
 * Whatever goes wrong — timeout, crash, non-JSON answer — is an error, and
 * the caller denies the request (fail closed).
 */
#include "fleetml/registry.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define HOOK_MAX_RESPONSE (64 * 1024)

typedef struct hook_buf {
    char data[HOOK_MAX_RESPONSE + 1];
    size_t len;
    int overflow;
} hook_buf;

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *ud)
{
    hook_buf *b = ud;
    size_t n = size * nmemb;
    if (b->len + n > HOOK_MAX_RESPONSE) {
        b->overflow = 1;
        return 0; /* aborts the transfer */
    }
    memcpy(b->data + b->len, ptr, n);
    b->len += n;
    return n;
}

static void curl_init_once(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
}

static int run_http(const char *url, const char *body, int timeout_ms, hook_buf *out,
                    fm_errbuf *err)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, curl_init_once);
    CURL *c = curl_easy_init();
    if (!c)
        return fm_errf(err, FM_ENOMEM, "hook: cannot create HTTP client");
    struct curl_slist *hdr = curl_slist_append(NULL, "Content-Type: application/json");
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdr);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)timeout_ms);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, out);
    CURLcode cc = curl_easy_perform(c);
    long status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(hdr);
    curl_easy_cleanup(c);
    if (cc == CURLE_OPERATION_TIMEDOUT)
        return fm_errf(err, FM_ETIMEDOUT, "hook: %s timed out", url);
    if (out->overflow)
        return fm_errf(err, FM_EPROTO, "hook: answer larger than %d bytes", HOOK_MAX_RESPONSE);
    if (cc != CURLE_OK)
        return fm_errf(err, FM_EIO, "hook: %s", curl_easy_strerror(cc));
    if (status < 200 || status > 299)
        return fm_errf(err, FM_EPROTO, "hook: HTTP status %ld", status);
    return 0;
}

static int run_exec(const char *path, const char *body, int timeout_ms, hook_buf *out,
                    fm_errbuf *err)
{
    int in[2], outp[2];
    if (pipe2(in, O_CLOEXEC) != 0)
        return fm_errf(err, FM_EIO, "hook: pipe: %s", strerror(errno));
    if (pipe2(outp, O_CLOEXEC) != 0) {
        close(in[0]);
        close(in[1]);
        return fm_errf(err, FM_EIO, "hook: pipe: %s", strerror(errno));
    }
    pid_t pid = fork();
    if (pid == 0) {
        dup2(in[0], STDIN_FILENO);
        dup2(outp[1], STDOUT_FILENO);
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0)
            dup2(devnull, STDERR_FILENO);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execl(path, path, (char *)NULL);
        _exit(127);
    }
    close(in[0]);
    close(outp[1]);
    if (pid < 0) {
        close(in[1]);
        close(outp[0]);
        return fm_errf(err, FM_EIO, "hook: fork: %s", strerror(errno));
    }
    /* The request is small (well under a pipe buffer), so writing it in
     * one go cannot block on a hook that does not read. A hook may answer
     * without reading its request at all (a fixed policy): whether it has
     * already exited when the request is written is a race, so EPIPE is not
     * an error — its answer and exit status decide, as for any hook. */
    size_t blen = strlen(body);
    ssize_t w = fm_write_nopipe(in[1], body, blen);
    int werr = errno;
    close(in[1]);
    int rc = (w == (ssize_t)blen || (w < 0 && werr == EPIPE))
                 ? 0
                 : fm_errf(err, FM_EIO, "hook: cannot write request: %s",
                           w < 0 ? strerror(werr) : "short write");
    uint64_t deadline = fm_mono_ns() + (uint64_t)timeout_ms * 1000000ull;
    while (rc == 0) {
        uint64_t now = fm_mono_ns();
        if (now >= deadline) {
            rc = fm_errf(err, FM_ETIMEDOUT, "hook: %s did not answer within %d ms", path,
                         timeout_ms);
            break;
        }
        struct pollfd pfd = {.fd = outp[0], .events = POLLIN};
        int pr = poll(&pfd, 1, (int)((deadline - now) / 1000000ull) + 1);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr <= 0)
            continue;
        ssize_t r = read(outp[0], out->data + out->len, HOOK_MAX_RESPONSE - out->len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break; /* EOF: the hook closed its output */
        out->len += (size_t)r;
        if (out->len >= HOOK_MAX_RESPONSE)
            rc = fm_errf(err, FM_EPROTO, "hook: answer larger than %d bytes", HOOK_MAX_RESPONSE);
    }
    close(outp[0]);
    int status = 0;
    if (rc != 0)
        kill(pid, SIGKILL);
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (rc == 0 && !(WIFEXITED(status) && WEXITSTATUS(status) == 0))
        rc = fm_errf(err, FM_EIO, "hook: %s exited with status %d", path,
                     WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    return rc;
}

int fm_registry_run_hook(const char *hook, json_t *request, int timeout_ms, json_t **response,
                         fm_errbuf *err)
{
    char *body = json_dumps(request, JSON_COMPACT);
    if (!body)
        return fm_errf(err, FM_ENOMEM, "hook: out of memory");
    hook_buf *buf = fm_calloc(1, sizeof *buf);
    int rc;
    if (!buf) {
        rc = fm_errf(err, FM_ENOMEM, "hook: out of memory");
    } else if (strncmp(hook, "http://", 7) == 0 || strncmp(hook, "https://", 8) == 0) {
        rc = run_http(hook, body, timeout_ms, buf, err);
    } else if (hook[0] == '/') {
        rc = run_exec(hook, body, timeout_ms, buf, err);
    } else {
        rc = fm_errf(err, FM_EINVAL, "hook: '%s' is neither a URL nor an absolute path", hook);
    }
    fm_free(body);
    if (rc == 0) {
        json_error_t je;
        json_t *doc = json_loadb(buf->data, buf->len, 0, &je);
        if (!json_is_object(doc)) {
            json_decref(doc);
            rc = fm_errf(err, FM_EPROTO, "hook: answer is not a JSON object");
        } else {
            *response = doc;
        }
    }
    fm_free(buf);
    return rc;
}
