/* Host demo: ./demo [-l] IMAGES.f32   or   ./demo [-l] -u IMAGES.u8
 * Reads N images (raw little-endian float32 [N, C, H, W] in [0, 1], or uint8 [N, C, H, W] with -u;
 * N = file size / image bytes) and prints one predicted class per line; -l appends the logits
 * (summed over the time steps) to each line. Host-only: the model itself uses no stdio. */
#include <stdio.h>
#include <string.h>

#include "ndsnn_model.h"

static float image_f32[NDSNN_INPUT_SIZE];
static uint8_t image_u8[NDSNN_INPUT_SIZE];

int main(int argc, char **argv)
{
    float logits[NDSNN_NUM_CLASSES];
    int with_logits = 0, as_u8 = 0, arg, i;
    FILE *file;
    if (argc > 1 && strcmp(argv[1], "-l") == 0) {
        with_logits = 1;
        argv++;
        argc--;
    }
    if (argc > 1 && strcmp(argv[1], "-u") == 0) {
        as_u8 = 1;
        argv++;
        argc--;
    }
    if (argc != 2) {
        fprintf(stderr, "usage: demo [-l] IMAGES.f32 | demo [-l] -u IMAGES.u8\n");
        return 2;
    }
    file = fopen(argv[1], "rb");
    if (file == NULL) {
        fprintf(stderr, "demo: cannot open %s\n", argv[1]);
        return 2;
    }
    for (;;) {
        int predicted;
        size_t got = as_u8 ? fread(image_u8, 1, NDSNN_INPUT_SIZE, file)
                           : fread(image_f32, sizeof(float), NDSNN_INPUT_SIZE, file);
        if (got == 0) {
            break;
        }
        if (got != NDSNN_INPUT_SIZE) {
            fprintf(stderr, "demo: %s ends inside an image\n", argv[1]);
            fclose(file);
            return 1;
        }
        predicted = as_u8 ? ndsnn_model_run_u8(image_u8, logits) : ndsnn_model_run(image_f32, logits);
        printf("%d", predicted);
        for (arg = 0; with_logits && arg < NDSNN_NUM_CLASSES; ++arg) {
            printf(" %.9g", (double)logits[arg]);
        }
        printf("\n");
    }
    i = ferror(file);
    fclose(file);
    return i ? 1 : 0;
}
