/* TFLite's TFLite_Detection_PostProcess (SSD): boxes decoded from center-size encodings and anchors, then non-max
 * suppression, fast (one class per anchor, the best ones) or regular (per class, then the best across classes).
 * Float, as the interpreter's kernel (which dequantizes quantized inputs first, done in the graph here). Sorting is
 * stable on descending scores, as the interpreter's (ties keep the lower index first). Detection slots past the
 * number found are zero. */
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { P_BOXES, P_CODE, P_CLASSES_BG, P_CLASSES, P_MAX_DET, P_MAX_PER_DET, P_PER_CLASS, P_REGULAR, P_SORT };
/* scratch (4-byte words): boxes 4n, keep n, order m, tmp m, selected n, keep scores n, active n, per anchor n,
 * then n * classes + 4 * (max_det + per_class), m = P_SORT = max(n, classes, max_det + per_class) */
enum { F_Y, F_X, F_H, F_W, F_SCORE, F_IOU };

/* stable merge sort of indices by values[] descending */
static void sort_desc(const float *values, int *idx, int *tmp, int n)
{
    for (int width = 1; width < n; width *= 2) {
        for (int lo = 0; lo < n; lo += 2 * width) {
            int mid = lo + width < n ? lo + width : n, hi = lo + 2 * width < n ? lo + 2 * width : n;
            int a = lo, b = mid, k = lo;
            while (a < mid && b < hi)
                tmp[k++] = values[idx[b]] > values[idx[a]] ? idx[b++] : idx[a++];
            while (a < mid)
                tmp[k++] = idx[a++];
            while (b < hi)
                tmp[k++] = idx[b++];
        }
        memcpy(idx, tmp, (size_t)n * sizeof(int));
    }
}

static float iou(const float *boxes, int i, int j)
{
    const float *a = boxes + 4 * i, *b = boxes + 4 * j; /* ymin, xmin, ymax, xmax */
    float area_a = (a[2] - a[0]) * (a[3] - a[1]), area_b = (b[2] - b[0]) * (b[3] - b[1]);
    if (area_a <= 0 || area_b <= 0)
        return 0.0f;
    float ymin = a[0] > b[0] ? a[0] : b[0], xmin = a[1] > b[1] ? a[1] : b[1];
    float ymax = a[2] < b[2] ? a[2] : b[2], xmax = a[3] < b[3] ? a[3] : b[3];
    float h = ymax - ymin > 0.0f ? ymax - ymin : 0.0f, w = xmax - xmin > 0.0f ? xmax - xmin : 0.0f;
    float inter = h * w;
    return inter / (area_a + area_b - inter);
}

struct work {
    const int32_t *p;
    const float *f, *boxes;
    int n;
    int *keep, *order, *tmp, *selected;
    float *keep_scores;
    uint8_t *active;
};

/* greedy NMS over one score per anchor: the selected anchors, best first; returns how many */
static int nms_single_class(const struct work *w, const float *scores, int max_out)
{
    int kept = 0;
    for (int i = 0; i < w->n; i++)
        if (scores[i] >= w->f[F_SCORE]) {
            w->keep_scores[kept] = scores[i];
            w->keep[kept++] = i;
        }
    for (int i = 0; i < kept; i++)
        w->order[i] = i;
    sort_desc(w->keep_scores, w->order, w->tmp, kept);
    int limit = kept < max_out ? kept : max_out, count = 0, active = kept;
    memset(w->active, 1, (size_t)kept);
    for (int i = 0; i < kept && active > 0 && count < limit; i++) {
        if (!w->active[i])
            continue;
        int box_i = w->keep[w->order[i]];
        w->selected[count++] = box_i;
        w->active[i] = 0;
        active--;
        for (int j = i + 1; j < kept; j++)
            if (w->active[j] && iou(w->boxes, box_i, w->keep[w->order[j]]) > w->f[F_IOU]) {
                w->active[j] = 0;
                active--;
            }
    }
    return count;
}

void tinymlaas_detection_postprocess(const float *encodings, const float *class_scores, const float *anchors,
                                     const int32_t *params, const float *fparams, float *scratch, float *out_boxes,
                                     float *out_classes, float *out_scores, float *out_count)
{
    const int n = params[P_BOXES], code = params[P_CODE], classes_bg = params[P_CLASSES_BG];
    const int classes = params[P_CLASSES], max_det = params[P_MAX_DET], offset = classes_bg - classes;
    const int m = params[P_SORT];
    float *boxes = scratch;
    int *keep = (int *)(scratch + 4 * n), *order = keep + n, *tmp = order + m, *selected = tmp + m;
    struct work w = {params, fparams, boxes, n, keep, order, tmp, selected, (float *)(selected + n),
                     (uint8_t *)(selected + 2 * n)};
    float *per_anchor = (float *)(selected + 3 * n);
    int *extra = selected + 4 * n; /* fast: sorted class indices per anchor; regular: the candidates across classes */
    for (int i = 0; i < n; i++) {
        const float *e = encodings + i * code, *a = anchors + 4 * i; /* y, x, h, w */
        float yc = (float)((double)e[0] / fparams[F_Y] * a[2] + a[0]);
        float xc = (float)((double)e[1] / fparams[F_X] * a[3] + a[1]);
        float half_h = (float)(0.5 * exp((double)e[2] / fparams[F_H]) * a[2]);
        float half_w = (float)(0.5 * exp((double)e[3] / fparams[F_W]) * a[3]);
        boxes[4 * i] = yc - half_h;
        boxes[4 * i + 1] = xc - half_w;
        boxes[4 * i + 2] = yc + half_h;
        boxes[4 * i + 3] = xc + half_w;
    }
    const int per_det = params[P_MAX_PER_DET] < classes ? params[P_MAX_PER_DET] : classes;
    const size_t slots = (size_t)max_det * params[P_MAX_PER_DET]; /* the outputs' size */
    memset(out_boxes, 0, slots * 4 * sizeof(float));
    memset(out_classes, 0, slots * sizeof(float));
    memset(out_scores, 0, slots * sizeof(float));
    int found = 0;
    if (!params[P_REGULAR]) {
        for (int i = 0; i < n; i++) {
            const float *s = class_scores + i * classes_bg + offset;
            int *order = extra + i * classes;
            for (int c = 0; c < classes; c++)
                order[c] = c;
            sort_desc(s, order, w.tmp, classes);
            per_anchor[i] = s[order[0]];
        }
        int selected = nms_single_class(&w, per_anchor, max_det);
        for (int k = 0, slot = 0; k < selected; k++) {
            int anchor = w.selected[k];
            const float *s = class_scores + anchor * classes_bg + offset;
            for (int c = 0; c < per_det; c++, slot++) {
                memcpy(out_boxes + 4 * slot, boxes + 4 * anchor, 4 * sizeof(float));
                out_classes[slot] = (float)extra[anchor * classes + c];
                out_scores[slot] = s[extra[anchor * classes + c]];
            }
        }
        found = selected; /* the interpreter counts anchors, not their class slots */
    } else {
        const int per_class = params[P_PER_CLASS];
        int *cand = extra + n * classes, *best = cand + (max_det + per_class);
        float *cand_scores = (float *)(extra + 2 * (max_det + per_class));
        float *best_scores = cand_scores + (max_det + per_class);
        for (int c = 0; c < classes; c++) {
            for (int i = 0; i < n; i++)
                per_anchor[i] = class_scores[i * classes_bg + c + offset];
            int selected = nms_single_class(&w, per_anchor, per_class), total = found;
            for (int k = 0; k < selected; k++, total++) {
                cand[total] = w.selected[k] * classes_bg + c + offset;
                cand_scores[total] = per_anchor[w.selected[k]];
            }
            for (int k = 0; k < total; k++)
                w.order[k] = k;
            sort_desc(cand_scores, w.order, w.tmp, total);
            found = total < max_det ? total : max_det;
            for (int k = 0; k < found; k++) {
                best[k] = cand[w.order[k]];
                best_scores[k] = cand_scores[w.order[k]];
            }
            memcpy(cand, best, (size_t)found * sizeof(int));
            memcpy(cand_scores, best_scores, (size_t)found * sizeof(float));
        }
        for (int k = 0; k < found; k++) {
            int anchor = cand[k] / classes_bg;
            memcpy(out_boxes + 4 * k, boxes + 4 * anchor, 4 * sizeof(float));
            out_classes[k] = (float)(cand[k] - anchor * classes_bg - offset);
            out_scores[k] = cand_scores[k];
        }
    }
    out_count[0] = (float)found;
}
