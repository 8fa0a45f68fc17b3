/* Bare-metal verification firmware for the emulated Cortex-M4 board (QEMU mps2-an386): runs the model on
 * images read from the host through ARM semihosting and writes what it computed back, with the cost.
 *
 *   qemu-system-arm -M mps2-an386 -display none -monitor none -serial none -icount shift=0 \
 *     -semihosting-config enable=on,target=native,arg=firmware,arg=IMAGES.f32,arg=RESULTS.bin \
 *     -kernel firmware.elf
 *
 * IMAGES.f32: raw little-endian float32 [N, C, H, W] in [0, 1], as the host demo reads. RESULTS.bin,
 * per image: int32 predicted class, NDSNN_NUM_CLASSES float32 summed logits, uint32 timer ticks of the
 * inference, uint32 stack bytes the inference used below its caller's frame; then a trailer: "NDSN",
 * uint32 images, uint32 ticks of a calibration loop of NDSNN_CALIBRATION_INSNS instructions.
 * The timer is the board's CMSDK APB timer 0 (25 MHz system clock); under `-icount shift=0` QEMU retires
 * one instruction per virtual nanosecond, so ticks count instructions (the calibration says how many per
 * tick). Exit status 0 when every image ran. */
#include <stddef.h>
#include <stdint.h>

#include "ndsnn_m4.h"
#include "ndsnn_model.h"

#define TIMER_CTRL (*(volatile uint32_t *)0x40000000u)
#define TIMER_VALUE (*(volatile uint32_t *)0x40000004u)
#define TIMER_RELOAD (*(volatile uint32_t *)0x40000008u)
#define STACK_PAINT 0xa5a5a5a5u
#define NDSNN_CALIBRATION_LOOPS 1000000u
#define NDSNN_CALIBRATION_INSNS (2u * NDSNN_CALIBRATION_LOOPS) /* subs + bne per loop */

extern uint32_t _stack_bottom;

typedef struct {
    int32_t predicted;
    float logits[NDSNN_NUM_CLASSES];
    uint32_t ticks; /* timer ticks of the inference */
    uint32_t stack; /* stack bytes the inference used below its caller's frame */
} result;

static float image[NDSNN_INPUT_SIZE];
static result record;
static char cmdline[256];

static uint32_t text_length(const char *text)
{
    uint32_t n = 0;
    while (text[n] != '\0') {
        ++n;
    }
    return n;
}

static int open_file(const char *name, uint32_t mode)
{
    uint32_t args[3];
    args[0] = (uint32_t)(uintptr_t)name;
    args[1] = mode; /* 1: "rb", 5: "wb" */
    args[2] = text_length(name);
    return (int)ndsnn_m4_semihost(0x01u, args);
}

/* read (op 0x06) or write (op 0x05) all `bytes`; returns the bytes not transferred */
static uint32_t transfer(uint32_t op, int handle, void *buffer, uint32_t bytes)
{
    uint32_t args[3];
    args[0] = (uint32_t)handle;
    args[1] = (uint32_t)(uintptr_t)buffer;
    args[2] = bytes;
    return ndsnn_m4_semihost(op, args);
}

/* argv[1], argv[2] of the semihosting command line (SYS_GET_CMDLINE): the images and results files */
static int arguments(const char **images, const char **results)
{
    uint32_t args[2];
    char *p = cmdline;
    const char *words[3] = {NULL, NULL, NULL};
    int n = 0;
    args[0] = (uint32_t)(uintptr_t)cmdline;
    args[1] = sizeof cmdline - 1u;
    if (ndsnn_m4_semihost(0x15u, args) != 0u) {
        return -1;
    }
    while (*p != '\0' && n < 3) {
        while (*p == ' ') {
            *p++ = '\0';
        }
        if (*p != '\0') {
            words[n++] = p;
        }
        while (*p != '\0' && *p != ' ') {
            ++p;
        }
    }
    *images = words[1];
    *results = words[2];
    return n == 3 ? 0 : -1;
}

static uint32_t calibration_ticks(void)
{
    uint32_t loops = NDSNN_CALIBRATION_LOOPS;
    uint32_t start = TIMER_VALUE;
    __asm__ volatile("1: subs %0, %0, #1\n\tbne 1b" : "+r"(loops) : : "cc");
    return start - TIMER_VALUE;
}

/* One image: paint the free stack below this frame, run, time and measure the stack the model used. */
static void run_one(void)
{
    uintptr_t sp;
    uint32_t *word = &_stack_bottom;
    uint32_t start, stop;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    while ((uintptr_t)word < sp) {
        *word++ = STACK_PAINT;
    }
    start = TIMER_VALUE;
    record.predicted = (int32_t)ndsnn_model_run(image, record.logits);
    stop = TIMER_VALUE;
    for (word = &_stack_bottom; (uintptr_t)word < sp && *word == STACK_PAINT; ++word) {
    }
    record.ticks = start - stop; /* a down-counter */
    record.stack = (uint32_t)(sp - (uintptr_t)word);
}

int main(void)
{
    const char *images_name, *results_name;
    uint32_t trailer[3];
    int in, out;
    TIMER_RELOAD = 0xffffffffu;
    TIMER_VALUE = 0xffffffffu;
    TIMER_CTRL = 1u; /* enable, no interrupt */
    if (arguments(&images_name, &results_name) != 0 || (in = open_file(images_name, 1u)) < 0 ||
        (out = open_file(results_name, 5u)) < 0) {
        return 1;
    }
    trailer[0] = 0x4e53444eu; /* "NDSN" */
    trailer[1] = 0u;
    while (transfer(0x06u, in, image, sizeof image) == 0u) {
        run_one();
        if (transfer(0x05u, out, &record, sizeof record) != 0u) {
            return 1;
        }
        ++trailer[1];
    }
    trailer[2] = calibration_ticks();
    return transfer(0x05u, out, trailer, sizeof trailer) != 0u;
}
