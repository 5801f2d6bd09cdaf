/*
 * MLflow model directories (fleetml/modelreg.h): the `MLmodel` file is
 * YAML, read with libyaml's document loader. Only what fleetml uses is
 * taken: the xgboost flavour's model file, the run and model ids (for the
 * lineage in the manifest) and the signature's input columns (checked
 * against the features this build computes).
 */
#include "fleetml/modelreg.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <yaml.h>

/* The value node of key in mapping node m, or NULL. */
static yaml_node_t *get(yaml_document_t *doc, yaml_node_t *m, const char *key)
{
    if (!m || m->type != YAML_MAPPING_NODE)
        return NULL;
    for (yaml_node_pair_t *p = m->data.mapping.pairs.start; p < m->data.mapping.pairs.top; p++) {
        yaml_node_t *k = yaml_document_get_node(doc, p->key);
        if (k && k->type == YAML_SCALAR_NODE && k->data.scalar.length == strlen(key) &&
            memcmp(k->data.scalar.value, key, k->data.scalar.length) == 0)
            return yaml_document_get_node(doc, p->value);
    }
    return NULL;
}

/* Copies a scalar node into dst; false when it is not a scalar or too long. */
static bool scalar(yaml_node_t *n, char *dst, size_t cap)
{
    if (!n || n->type != YAML_SCALAR_NODE || n->data.scalar.length >= cap)
        return false;
    memcpy(dst, n->data.scalar.value, n->data.scalar.length);
    dst[n->data.scalar.length] = '\0';
    return strlen(dst) == n->data.scalar.length; /* no NUL inside */
}

/* signature.inputs is a JSON string: [{"name": ..., "type": ...}, ...]. */
static int read_inputs(yaml_node_t *n, fm_mlflow_model *out, fm_errbuf *err)
{
    if (!n)
        return 0;
    if (n->type != YAML_SCALAR_NODE)
        return fm_errf(err, FM_EINVAL, "MLmodel: signature.inputs must be a JSON string");
    json_t *cols = json_loadb((const char *)n->data.scalar.value, n->data.scalar.length, 0, NULL);
    int rc = 0;
    if (!json_is_array(cols) || json_array_size(cols) > FM_FEATURES_MAX) {
        rc = fm_errf(err, FM_EINVAL, "MLmodel: signature.inputs must list at most %d columns",
                     FM_FEATURES_MAX);
    } else {
        for (size_t i = 0; i < json_array_size(cols) && !rc; i++) {
            const char *name = json_string_value(json_object_get(json_array_get(cols, i), "name"));
            if (!name || !*name || strlen(name) >= sizeof out->inputs[0])
                rc = fm_errf(err, FM_EINVAL,
                             "MLmodel: signature.inputs[%zu] needs a name (tensor signatures "
                             "are not supported: log the model with a column signature)",
                             i);
            else
                snprintf(out->inputs[out->ninputs++], sizeof out->inputs[0], "%s", name);
        }
    }
    json_decref(cols);
    return rc;
}

int fm_mlflow_parse(const char *text, size_t len, fm_mlflow_model *out, fm_errbuf *err)
{
    memset(out, 0, sizeof *out);
    yaml_parser_t parser;
    yaml_document_t doc;
    if (!yaml_parser_initialize(&parser))
        return fm_errf(err, FM_ENOMEM, "out of memory");
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    if (!yaml_parser_load(&parser, &doc)) {
        int rc = fm_errf(err, FM_EINVAL, "MLmodel: not YAML (line %zu: %s)",
                         parser.problem_mark.line + 1,
                         parser.problem ? parser.problem : "unreadable");
        yaml_parser_delete(&parser);
        return rc;
    }
    int rc = 0;
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    yaml_node_t *xgb = get(&doc, get(&doc, root, "flavors"), "xgboost");
    if (!xgb) {
        rc = fm_errf(err, FM_EINVAL, "MLmodel: no xgboost flavour (flavors.xgboost)");
    } else if (!scalar(get(&doc, xgb, "data"), out->data, sizeof out->data) || !out->data[0] ||
               out->data[0] == '/' || strstr(out->data, "..")) {
        rc = fm_errf(err, FM_EINVAL,
                     "MLmodel: flavors.xgboost.data must name the model file inside the "
                     "directory");
    } else {
        scalar(get(&doc, root, "run_id"), out->run_id, sizeof out->run_id);
        scalar(get(&doc, root, "model_uuid"), out->model_uuid, sizeof out->model_uuid);
        rc = read_inputs(get(&doc, get(&doc, root, "signature"), "inputs"), out, err);
    }
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    return rc;
}

int fm_mlflow_join(const char *mlmodel, size_t len, char **manifest, size_t *mlen,
                   fm_errbuf *err)
{
    fm_mlflow_model mm;
    int rc = fm_mlflow_parse(mlmodel, len, &mm, err);
    if (rc)
        return rc;
    json_error_t je;
    json_t *man = json_loadb(*manifest, *mlen, JSON_REJECT_DUPLICATES, &je);
    json_t *feats = json_object_get(man, "features");
    if (!json_is_object(man) || !json_is_array(feats)) {
        json_decref(man);
        return fm_errf(err, FM_EINVAL, "manifest: expected an object with a features list");
    }
    for (size_t i = 0; mm.ninputs && (i < mm.ninputs || i < json_array_size(feats)); i++) {
        const char *f = json_string_value(json_array_get(feats, i));
        if (i >= mm.ninputs || !f || strcmp(f, mm.inputs[i]) != 0) {
            rc = fm_errf(err, FM_EINVAL,
                           "MLmodel: signature column %zu is %s%s%s, the manifest's feature is "
                           "%s%s%s",
                           i, i < mm.ninputs ? "'" : "", i < mm.ninputs ? mm.inputs[i] : "nothing",
                           i < mm.ninputs ? "'" : "", f ? "'" : "", f ? f : "nothing",
                           f ? "'" : "");
            json_decref(man);
            return rc;
        }
    }
    json_t *tr = json_object_get(man, "training");
    if (!json_is_object(tr)) {
        tr = json_object();
        json_object_set_new(man, "training", tr);
    }
    json_object_set_new(tr, "mlflow",
                        json_pack("{s:s,s:s,s:s}", "flavor", "xgboost", "run_id", mm.run_id,
                                  "model_uuid", mm.model_uuid));
    char *text = json_dumps(man, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(man);
    if (!text)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    fm_free(*manifest);
    *manifest = text;
    *mlen = strlen(text);
    return 0;
}
