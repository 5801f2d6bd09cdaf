/*
 * The dashboard's files, embedded at build time (cmake/embed_web.cmake from
 * src/api/web and the npm libraries it uses) and served on the API listener
 * by src/api/http.c.
 */
#ifndef FLEETML_API_WEB_H
#define FLEETML_API_WEB_H

typedef struct fm_web_asset {
    const char *path; /* URL path: "/" or "/assets/<name>"; NULL ends the table */
    const char *type; /* Content-Type */
    const unsigned char *data;
    unsigned long len;
} fm_web_asset;

/* Every asset, ended by an entry whose path is NULL (static, never freed). */
extern const fm_web_asset fm_web_assets[];

/* The asset served at path, or NULL. */
const fm_web_asset *fm_web_find(const char *path);

/* The Content-Security-Policy of the dashboard's pages: this origin's
 * scripts, styles and API only, no inline script, no framing. */
#define FM_WEB_CSP                                                                                 \
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "             \
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

#endif
