/* classify.c: the verdict rules of retest (docs/verdicts.md), native half.
 *
 * python/retest/_classify_py.py is the same algorithm in Python and must give exactly the
 * same (kind, rule, reason, infra) for every input; tests/test_classify.py runs each case
 * against both. Change one, change the other.
 *
 * Shape: pg_classify() checks and converts its arguments with the GIL, decide() runs the
 * rules on plain C data with the GIL released (the bytes objects stay referenced by the
 * caller's argument array, and bytes are immutable), then the reason string is built with
 * the GIL again. Every scan is linear in the output size and nothing is allocated in
 * proportion to it: the summary line and the quoted line are copied into fixed buffers.
 */
#include "proc_group.h"

#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* A line longer than this (raw bytes) is never a pytest summary line. */
#define SUMMARY_LINE_MAX 4096
/* Bytes of a matched line quoted in a reason: a window around the match. */
#define QUOTE_MAX 200
/* Below this many bytes of output, releasing the GIL costs more than the scan. */
#define RELEASE_GIL_BYTES (64 * 1024)

/* Must equal proc_group.LOCK_BUSY_MESSAGE (a test checks it). */
#define LOCK_BUSY_MESSAGE "retest: repository lock busy"
#define COLLECTION_ERROR_MARK "ERROR collecting"
/* pytest-timeout's thread method prints this, dumps stacks and calls os._exit(1). */
#define TEST_TIMEOUT_MARK "+++ Timeout +++"
/* What "python -m pytest" prints (exit 1) when the interpreter has no pytest. */
#define NO_PYTEST_MARK "No module named pytest"
/* pytest's PytestConfigWarning text; with filterwarnings=error it is a crash (exit 1). */
#define NO_TEST_FILES_MARK "No files were found in testpaths"
/* unittest's (and Django's test runner's) last line when a test failed: "FAILED (failures=1,
 * errors=2)"; the first count it prints is one of these. Only for a command that is not
 * pytest (pytest prints "FAILED tests/x.py::t"). */
static const char *const unittest_failed_marks[] = {
    "FAILED (failures=", "FAILED (errors=", "FAILED (unexpected successes=",
};

/* unittest's (and Django's test runner's) count line at a line's start, "Ran 3 tests in
 * 0.002s"; after a blank line, its result: "OK", "OK (skipped=3)", "FAILED (...)". */
#define UNITTEST_RAN_MARK "\nRan "
#define UNITTEST_SKIPPED_MARK "\n\nOK (skipped="
/* Digits read of one count (a longer one is not unittest's, and would overflow). */
#define COUNT_DIGITS_MAX 9

enum rule_id {
    RULE_TIMEOUT_DEADLINE,
    RULE_PASSED_EXIT_0,
    RULE_OTHER_SPAWN_ERROR,
    RULE_OTHER_NO_STATUS,
    RULE_LOCK_GATE,
    RULE_LOCK_GIT,
    RULE_LOCK_SQLITE,
    RULE_RED_TESTS_FAILED,
    RULE_RED_COLLECTION_ERROR,
    RULE_RED_TEST_ERRORS,
    RULE_RED_TEST_TIMEOUT,
    RULE_RED_EXIT_1,
    RULE_OTHER_SIGNAL,
    RULE_OTHER_INTERRUPTED,
    RULE_OTHER_INTERNAL_ERROR,
    RULE_OTHER_USAGE_ERROR,
    RULE_OTHER_NO_TESTS,
    RULE_OTHER_EXIT_STATUS,
    RULE_OTHER_ENVIRONMENT,
    RULE_OTHER_NO_TEST_FILES, /* the id of RULE_OTHER_NO_TESTS, another reason */
    RULE_RED_UNITTEST,        /* the id of RULE_RED_TESTS_FAILED, unittest's summary */
    RULE_OTHER_UNITTEST_NONE,    /* the id of RULE_OTHER_NO_TESTS: unittest ran 0 tests */
    RULE_OTHER_UNITTEST_SKIPPED, /* the id of RULE_OTHER_NO_TESTS: it skipped all it ran */
};

static const struct {
    const char *kind;
    const char *id;
    bool infra;
} rules[] = {
    [RULE_TIMEOUT_DEADLINE] = {"timeout", "timeout.deadline", true},
    [RULE_PASSED_EXIT_0] = {"passed", "passed.exit-0", false},
    [RULE_OTHER_SPAWN_ERROR] = {"other", "other.spawn-error", false},
    [RULE_OTHER_NO_STATUS] = {"other", "other.no-status", false},
    [RULE_LOCK_GATE] = {"lock-busy", "lock-busy.gate-lock", true},
    [RULE_LOCK_GIT] = {"lock-busy", "lock-busy.git-lock", true},
    [RULE_LOCK_SQLITE] = {"lock-busy", "lock-busy.sqlite", true},
    [RULE_RED_TESTS_FAILED] = {"red", "red.tests-failed", false},
    [RULE_RED_COLLECTION_ERROR] = {"red", "red.collection-error", false},
    [RULE_RED_TEST_ERRORS] = {"red", "red.test-errors", false},
    [RULE_RED_TEST_TIMEOUT] = {"red", "red.test-timeout", false},
    [RULE_RED_EXIT_1] = {"red", "red.exit-1", false},
    [RULE_OTHER_SIGNAL] = {"other", "other.signal", false},
    [RULE_OTHER_INTERRUPTED] = {"other", "other.interrupted", false},
    [RULE_OTHER_INTERNAL_ERROR] = {"other", "other.internal-error", false},
    [RULE_OTHER_USAGE_ERROR] = {"other", "other.usage-error", false},
    [RULE_OTHER_NO_TESTS] = {"other", "other.no-tests", false},
    [RULE_OTHER_EXIT_STATUS] = {"other", "other.exit-status", false},
    [RULE_OTHER_ENVIRONMENT] = {"other", "other.environment", false},
    [RULE_OTHER_NO_TEST_FILES] = {"other", "other.no-tests", false},
    [RULE_RED_UNITTEST] = {"red", "red.tests-failed", false},
    [RULE_OTHER_UNITTEST_NONE] = {"other", "other.no-tests", false},
    [RULE_OTHER_UNITTEST_SKIPPED] = {"other", "other.no-tests", false},
};

/* Lock patterns in priority order; the first found (stdout, then stderr) decides. Git's bare
 * "Unable to create '...lock'" is left out on purpose: git prints it for EACCES and ENOSPC
 * too, which are not a held lock; a held lock always adds "': File exists". */
static const struct {
    enum rule_id rule;
    const char *pattern;
} lock_patterns[] = {
    {RULE_LOCK_GATE, LOCK_BUSY_MESSAGE},
    {RULE_LOCK_GIT, ".lock': File exists"},
    {RULE_LOCK_GIT, "Another git process seems to be running"},
    {RULE_LOCK_SQLITE, "database is locked"},
};

/* Words of one summary item, "N word [word [word]]" ("2 subtests passed"). */
#define ITEM_WORDS_MAX 3

typedef struct {
    const unsigned char *data;
    size_t len;
} buffer;

typedef struct {
    bool found;
    bool failed; /* a nonzero "failed" count */
    bool errors; /* a nonzero "error"/"errors" count */
    size_t len;
    char text[SUMMARY_LINE_MAX]; /* ANSI and '=' decoration removed; ASCII by the grammar */
} summary_line;

typedef struct {
    bool found;
    bool cut_head, cut_tail; /* the window starts after / ends before the line does */
    size_t len;
    char text[QUOTE_MAX]; /* raw bytes, ANSI removed; decoded with "replace" later */
} quoted_line;

/* Everything decide() reads and writes: plain C data, so it can run without the GIL. */
typedef struct {
    buffer out, err;
    bool has_returncode;
    long long returncode;
    bool timed_out;
    bool has_spawn_error;
    bool is_pytest; /* the command is pytest itself: its exit statuses have their pytest meaning */
    enum rule_id rule;
    summary_line summary;
    quoted_line quote;
} verdict;

/* ------------------------------------------------------------------------ scanning */

/* Copy src to dst without CSI escapes (ESC [ params intermediates final); return the length.
 * The three byte classes are disjoint, so one forward pass removes exactly what the Python
 * twin's regex removes; an incomplete sequence is kept as plain bytes. */
static size_t strip_ansi(const unsigned char *src, size_t len, char *dst)
{
    size_t out = 0;
    size_t i = 0;
    while (i < len) {
        if (src[i] == 0x1b && i + 1 < len && src[i + 1] == '[') {
            size_t j = i + 2;
            while (j < len && src[j] >= 0x30 && src[j] <= 0x3f)
                j++;
            while (j < len && src[j] >= 0x20 && src[j] <= 0x2f)
                j++;
            if (j < len && src[j] >= 0x40 && src[j] <= 0x7e) {
                i = j + 1;
                continue;
            }
        }
        dst[out++] = (char)src[i++];
    }
    return out;
}

/* The decoration trimmed from both ends of a summary line (" \t\v\f=") or, with underscore,
 * of a quote (pytest's "____ ERROR collecting x.py ____"). */
static inline bool is_trimmed(unsigned char c, bool underscore)
{
    return c == ' ' || c == '=' || c == '\t' || c == '\v' || c == '\f' || (underscore && c == '_');
}

/* Trim decoration from both ends of text[0..*len); return the new start offset. */
static size_t trim(const char *text, size_t *len, bool underscore)
{
    size_t start = 0, end = *len;
    while (start < end && is_trimmed((unsigned char)text[start], underscore))
        start++;
    while (end > start && is_trimmed((unsigned char)text[end - 1], underscore))
        end--;
    *len = end - start;
    return start;
}

static inline bool is_line_break(unsigned char c)
{
    return c == '\n' || c == '\r';
}

/* Offset of the last '\n' or '\r' in [low, high), or -1; reads only the bytes after it. */
static Py_ssize_t last_break(const buffer *buf, size_t low, size_t high)
{
    while (high > low) {
        high--;
        if (is_line_break(buf->data[high]))
            return (Py_ssize_t)high;
    }
    return -1;
}

/* Offset of the first '\n' or '\r' in [low, high), or high; reads only the bytes before it. */
static size_t first_break(const buffer *buf, size_t low, size_t high)
{
    while (low < high && !is_line_break(buf->data[low]))
        low++;
    return low;
}

/* Start of the line holding pos if it is >= floor (floor <= pos), else floor - 1. Bounded:
 * reads at most pos - floor + 1 bytes, so no caller re-reads a long line per anchor. */
static size_t line_start(const buffer *buf, size_t pos, size_t floor)
{
    size_t low = floor > 0 ? floor - 1 : 0;
    Py_ssize_t found = last_break(buf, low, pos);
    return found >= 0 ? (size_t)found + 1 : low;
}

/* End of the line holding pos if it is <= ceiling, else ceiling + 1; never past the buffer's
 * end. Bounded like line_start: reads at most ceiling - pos + 1 bytes. */
static size_t line_end(const buffer *buf, size_t pos, size_t ceiling)
{
    size_t high = ceiling < buf->len ? ceiling + 1 : buf->len;
    return first_break(buf, pos, high);
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* Consume "[0-9]+" at *p; return false if there is no digit. Sets *nonzero if one isn't '0'. */
static bool take_digits(const char **p, const char *end, bool *nonzero)
{
    const char *start = *p;
    while (*p < end && is_digit(**p)) {
        if (**p != '0')
            *nonzero = true;
        (*p)++;
    }
    return *p > start;
}

/* Consume the literal at *p if it is there. Inline so strlen() of a literal folds away. */
static inline bool take(const char **p, const char *end, const char *literal)
{
    size_t n = strlen(literal);
    if ((size_t)(end - *p) < n || memcmp(*p, literal, n) != 0)
        return false;
    *p += n;
    return true;
}

/* True if [word, word + len) is the literal. */
static bool word_is(const char *word, size_t len, const char *literal)
{
    return len == strlen(literal) && memcmp(word, literal, len) == 0;
}

/* Consume " WORD" (WORD = [a-z]+) at *p into (*word, *len); false if there is none, or if it is
 * the "in" of " in <digit>": an item word there could be followed by neither ", " nor " in ",
 * so refusing it is what makes one left-to-right pass parse exactly the documented grammar. */
static bool take_word(const char **p, const char *end, const char **word, size_t *len)
{
    if (*p >= end || **p != ' ')
        return false;
    const char *start = *p + 1, *q = start;
    while (q < end && *q >= 'a' && *q <= 'z')
        q++;
    size_t n = (size_t)(q - start);
    if (n == 0 || (word_is(start, n, "in") && end - q >= 2 && q[0] == ' ' && is_digit(q[1])))
        return false;
    *word = start;
    *len = n;
    *p = q;
    return true;
}

/* Consume one item "[0-9]+ (" " WORD){1,3}" and fold its count into the summary (its LAST
 * word says what it counts: "2 subtests failed" is failures); false if it is not one. */
static bool take_count(const char **p, const char *end, summary_line *summary)
{
    bool nonzero = false;
    const char *word;
    size_t len;
    if (!take_digits(p, end, &nonzero) || !take_word(p, end, &word, &len))
        return false;
    for (int words = 1; words < ITEM_WORDS_MAX && take_word(p, end, &word, &len); words++)
        continue;
    if (nonzero && word_is(word, len, "failed"))
        summary->failed = true;
    if (nonzero && (word_is(word, len, "error") || word_is(word, len, "errors")))
        summary->errors = true;
    return true;
}

/* True if text is a pytest final summary body: ("no tests ran" | item (", " item)*)
 * " in " seconds ("s" | " seconds") [" (" [0-9:]+ ")"], and nothing else. */
static bool parse_summary_body(const char *text, size_t len, summary_line *summary)
{
    const char *p = text, *end = text + len;
    bool ignored = false;
    summary->failed = summary->errors = false;
    if (!take(&p, end, "no tests ran")) {
        do {
            if (!take_count(&p, end, summary))
                return false;
        } while (take(&p, end, ", "));
    }
    if (!take(&p, end, " in ") || !take_digits(&p, end, &ignored))
        return false;
    if (take(&p, end, ".") && !take_digits(&p, end, &ignored))
        return false;
    if (!take(&p, end, "s") && !take(&p, end, " seconds"))
        return false;
    if (p < end) {
        if (!take(&p, end, " ("))
            return false;
        const char *clock = p;
        while (p < end && (is_digit(*p) || *p == ':'))
            p++;
        if (p == clock || !take(&p, end, ")"))
            return false;
    }
    return p == end;
}

/* Fill summary from the raw line [start, stop) if it is a pytest summary line. */
static bool parse_summary_line(const buffer *buf, size_t start, size_t stop, summary_line *summary)
{
    char stripped[SUMMARY_LINE_MAX];
    size_t len = strip_ansi(buf->data + start, stop - start, stripped);
    size_t offset = trim(stripped, &len, false);
    if (!parse_summary_body(stripped + offset, len, summary))
        return false;
    memcpy(summary->text, stripped + offset, len);
    summary->len = len;
    summary->found = true;
    return true;
}

/* True if the raw line [start, stop) cannot be a summary judging by its first byte that
 * trimming would keep. Exact, not a heuristic: if that byte is not ESC, removing escapes
 * leaves it first, and a summary body starts with a digit or "no tests ran". */
static bool cannot_be_summary(const buffer *buf, size_t start, size_t stop)
{
    while (start < stop && is_trimmed(buf->data[start], false))
        start++;
    if (start == stop)
        return true;
    unsigned char first = buf->data[start];
    return !(first == 0x1b || first == 'n' || (first >= '0' && first <= '9'));
}

/* True if an anchor " in <digit>" starts at pos (the caller guarantees pos + 4 < len). */
static inline bool anchor_at(const unsigned char *b, size_t pos)
{
    return b[pos] == ' ' && b[pos + 1] == 'i' && b[pos + 2] == 'n' && b[pos + 3] == ' ' &&
           b[pos + 4] >= '0' && b[pos + 4] <= '9';
}

/* Highest pos <= top where an anchor starts, or -1; top + 4 < buf->len. */
static Py_ssize_t last_anchor(const buffer *buf, size_t top)
{
    const unsigned char *b = buf->data;
    size_t end = top + 1; /* candidates left to look at: [0, end) */
#ifdef __SSE2__
    /* 16 candidates per step, backwards: five overlapping loads compared with ' ', 'i', 'n',
     * ' ' and the digit range, ANDed into one bit per candidate. Memory-bound (a byte loop is
     * several times slower), and no call per hit, so anchor-dense text stays cheap too. */
    const __m128i space = _mm_set1_epi8(' '), letter_i = _mm_set1_epi8('i');
    const __m128i letter_n = _mm_set1_epi8('n');
    const __m128i below_0 = _mm_set1_epi8('0' - 1), above_9 = _mm_set1_epi8('9' + 1);
    while (end >= 16) {
        const unsigned char *p = b + end - 16; /* reads up to p + 19 = b + top + 4 */
        __m128i hit = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)p), space);
        hit = _mm_and_si128(hit, _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(p + 1)), letter_i));
        hit = _mm_and_si128(hit, _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(p + 2)), letter_n));
        hit = _mm_and_si128(hit, _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(p + 3)), space));
        /* Signed compares: bytes >= 0x80 are negative, so they fail "> '0' - 1". */
        __m128i first_digit = _mm_loadu_si128((const __m128i *)(p + 4));
        hit = _mm_and_si128(hit, _mm_and_si128(_mm_cmpgt_epi8(first_digit, below_0),
                                                _mm_cmplt_epi8(first_digit, above_9)));
        unsigned mask = (unsigned)_mm_movemask_epi8(hit);
        if (mask != 0)
            return (Py_ssize_t)(end - 16) + 31 - __builtin_clz(mask);
        end -= 16;
    }
#endif
    while (end > 0) {
        end--;
        if (anchor_at(b, end))
            return (Py_ssize_t)end;
    }
    return -1;
}

/* True (and summary filled) if the line starting at start that holds pos is a summary. */
static bool is_summary_line(const buffer *buf, size_t start, size_t pos, summary_line *summary)
{
    size_t stop = line_end(buf, pos, start + SUMMARY_LINE_MAX);
    return stop - start <= SUMMARY_LINE_MAX && !cannot_be_summary(buf, start, stop) &&
           parse_summary_line(buf, start, stop, summary);
}

/* Find the last pytest summary line of buf, scanning from the end. */
static bool find_summary(const buffer *buf, summary_line *summary)
{
    /* Every summary holds the anchor " in <digit>" verbatim (pytest never colours inside
     * " in 0.31s"), so only lines with an anchor are parsed, last anchor first, as the Python
     * twin's rfind loop does. A line that fails is skipped whole (the search resumes below
     * its start, or below the window for a line longer than SUMMARY_LINE_MAX, whose start is
     * never looked for), so each byte is looked at a bounded number of times, whatever the
     * input: a buffer of '\r'-separated progress bars included (issue 9). */
    size_t limit = buf->len; /* an anchor's " in " must end before limit */
    while (limit >= 5) {
        size_t top = limit - 5; /* also keeps the digit, pos + 4, inside the buffer */
        Py_ssize_t found = last_anchor(buf, top);
        if (found < 0)
            return false;
        size_t pos = (size_t)found;
        size_t floor = pos > SUMMARY_LINE_MAX ? pos - SUMMARY_LINE_MAX : 0;
        size_t start = line_start(buf, pos, floor);
        /* start < floor: the line is too long, and the search resumes below floor. */
        if (start >= floor && is_summary_line(buf, start, pos, summary))
            return true;
        limit = start;
    }
    return false;
}

/* Bytes per block of the backward literal search (see last_occurrence). */
#define SEARCH_BLOCK (64 * 1024)

/* Offset of the last occurrence of pattern in buf (as bytes.rfind), or -1. */
static Py_ssize_t last_occurrence(const buffer *buf, const char *pattern)
{
    /* There is no reverse memmem: search block by block from the end, forward within a block
     * (glibc's memmem is linear), and stop at the first block with a hit, so a log that ends
     * with the pattern costs one block and a pattern-dense one costs no call per hit overall. */
    size_t n = strlen(pattern);
    size_t high = buf->len; /* occurrences must end at or before high */
    while (high >= n) {
        size_t low = high > SEARCH_BLOCK ? high - SEARCH_BLOCK : 0;
        Py_ssize_t last = -1;
        size_t from = low;
        const unsigned char *hit;
        while (from + n <= high && (hit = memmem(buf->data + from, high - from, pattern, n))) {
            last = (Py_ssize_t)(hit - buf->data);
            from = (size_t)last + 1; /* overlapping hits count, as in rfind */
        }
        if (last >= 0 || low == 0)
            return last;
        high = low + n - 1; /* the next block's hits start before low */
    }
    return -1;
}

/* Quote up to QUOTE_MAX bytes of the line holding pos, from QUOTE_MAX/2 before pos. */
static void make_quote(const buffer *buf, size_t pos, quoted_line *quote)
{
    /* Both bounds are looked for only as far as the window reaches: a quote costs QUOTE_MAX
     * bytes however long its line (the bounds' "else" values mean "cut here"). */
    size_t floor = pos > QUOTE_MAX / 2 ? pos - QUOTE_MAX / 2 : 0;
    size_t start = line_start(buf, pos, floor);
    size_t low = start > floor ? start : floor;
    size_t stop = line_end(buf, pos, low + QUOTE_MAX);
    size_t high = stop - low > QUOTE_MAX ? low + QUOTE_MAX : stop;
    char stripped[QUOTE_MAX];
    size_t len = strip_ansi(buf->data + low, high - low, stripped);
    size_t offset = trim(stripped, &len, true);
    memcpy(quote->text, stripped + offset, len);
    quote->len = len;
    quote->cut_head = low > start;
    quote->cut_tail = high < stop;
    quote->found = true;
}

/* Quote the last pattern of stdout, else of stderr; false if neither holds it. */
static bool search(const verdict *v, const char *pattern, quoted_line *quote)
{
    const buffer *buffers[2] = {&v->out, &v->err};
    for (int i = 0; i < 2; i++) {
        Py_ssize_t pos = last_occurrence(buffers[i], pattern);
        if (pos >= 0) {
            make_quote(buffers[i], (size_t)pos, quote);
            return true;
        }
    }
    return false;
}

/* ------------------------------------------------------------------------ the rules */

/* The rule an exit status alone implies; pytest's statuses 1..5 mean something only when
 * the command was pytest itself (a wrapper's exit 2 is not "interrupted"). */
static enum rule_id status_rule(long long rc, bool is_pytest)
{
    if (rc < 0)
        return RULE_OTHER_SIGNAL;
    if (!is_pytest)
        return RULE_OTHER_EXIT_STATUS;
    switch (rc) {
    case 1:
        return RULE_RED_EXIT_1;
    case 2:
        return RULE_OTHER_INTERRUPTED;
    case 3:
        return RULE_OTHER_INTERNAL_ERROR;
    case 4:
        return RULE_OTHER_USAGE_ERROR;
    case 5:
        return RULE_OTHER_NO_TESTS;
    default:
        return RULE_OTHER_EXIT_STATUS;
    }
}

/* Set *rule to the lock rule of the first lock pattern the output holds (quoted into
 * v->quote); false if it holds none. */
static bool find_lock(verdict *v, enum rule_id *rule)
{
    for (size_t i = 0; i < sizeof(lock_patterns) / sizeof(lock_patterns[0]); i++) {
        if (search(v, lock_patterns[i].pattern, &v->quote)) {
            *rule = lock_patterns[i].rule;
            return true;
        }
    }
    return false;
}

/* Quote unittest's "FAILED (...)" line into v->quote: the first of its marks found
 * (stdout, then stderr). False if the output has none. */
static bool find_unittest_failure(verdict *v)
{
    for (size_t i = 0; i < sizeof(unittest_failed_marks) / sizeof(unittest_failed_marks[0]); i++)
        if (search(v, unittest_failed_marks[i], &v->quote))
            return true;
    return false;
}

/* The count of at most COUNT_DIGITS_MAX digits at buf[*at], *at moved past it; -1 if none. */
static long long count_at(const buffer *buf, size_t *at)
{
    long long n = 0;
    size_t i = *at;
    while (i < buf->len && i - *at < COUNT_DIGITS_MAX && buf->data[i] >= '0' && buf->data[i] <= '9')
        n = n * 10 + (buf->data[i++] - '0');
    if (i == *at || (i < buf->len && buf->data[i] >= '0' && buf->data[i] <= '9'))
        return -1;
    *at = i;
    return n;
}

/* Whether buf holds text at at. */
static bool holds_at(const buffer *buf, size_t at, const char *text)
{
    size_t n = strlen(text);
    return at <= buf->len && buf->len - at >= n && memcmp(buf->data + at, text, n) == 0;
}

/* A passing command that is not pytest and printed no pytest summary, judged on unittest's
 * last count line (stdout, else stderr): RULE_OTHER_UNITTEST_NONE for "Ran 0 tests",
 * RULE_OTHER_UNITTEST_SKIPPED when its result is "OK (skipped=N)" for all N it ran (the
 * line quoted into v->quote), else RULE_PASSED_EXIT_0. */
static enum rule_id unittest_pass_rule(verdict *v)
{
    const buffer *buffers[2] = {&v->out, &v->err};
    for (int i = 0; i < 2; i++) {
        const buffer *buf = buffers[i];
        Py_ssize_t pos = last_occurrence(buf, UNITTEST_RAN_MARK);
        size_t at, eol;
        long long ran, skipped;
        if (pos < 0)
            continue;
        at = (size_t)pos + strlen(UNITTEST_RAN_MARK);
        ran = count_at(buf, &at);
        if (ran < 0 || !(holds_at(buf, at, " tests in ") || holds_at(buf, at, " test in ")))
            return RULE_PASSED_EXIT_0;
        make_quote(buf, (size_t)pos + 1, &v->quote);
        if (ran == 0)
            return RULE_OTHER_UNITTEST_NONE;
        for (eol = at; eol < buf->len && buf->data[eol] != '\n'; eol++)
            ;
        if (!holds_at(buf, eol, UNITTEST_SKIPPED_MARK))
            return RULE_PASSED_EXIT_0;
        at = eol + strlen(UNITTEST_SKIPPED_MARK);
        skipped = count_at(buf, &at);
        return skipped == ran && holds_at(buf, at, ")") ? RULE_OTHER_UNITTEST_SKIPPED
                                                          : RULE_PASSED_EXIT_0;
    }
    return RULE_PASSED_EXIT_0;
}

/* The rule of a run that started and failed: the output's evidence first, then the status. */
static enum rule_id failure_rule(verdict *v)
{
    const summary_line *s = &v->summary;
    long long rc = v->returncode;
    bool failures = s->found && (s->failed || s->errors);
    quoted_line unused;
    enum rule_id lock;
    /* A lock only explains the failure if no test had failed yet. */
    if (!failures && find_lock(v, &lock))
        return lock;
    if (!s->found && rc > 0 && search(v, NO_PYTEST_MARK, &v->quote))
        return RULE_OTHER_ENVIRONMENT;
    if (s->found && s->failed)
        return RULE_RED_TESTS_FAILED;
    if (((s->found && s->errors) || (v->is_pytest && rc == 2)) &&
        search(v, COLLECTION_ERROR_MARK, &v->quote))
        return RULE_RED_COLLECTION_ERROR;
    if (s->found && s->errors)
        return RULE_RED_TEST_ERRORS;
    if (rc == 1 && search(v, TEST_TIMEOUT_MARK, &unused))
        return RULE_RED_TEST_TIMEOUT;
    if (rc > 0 && search(v, NO_TEST_FILES_MARK, &v->quote))
        return RULE_OTHER_NO_TEST_FILES;
    if (rc > 0 && !v->is_pytest && !s->found && find_unittest_failure(v))
        return RULE_RED_UNITTEST;
    return status_rule(rc, v->is_pytest);
}

/* Set v->rule (and the summary and quote its reason needs): the first rule that matches, in
 * the order of docs/verdicts.md. Pure C on immutable buffers: runs without the GIL. */
static void decide(verdict *v)
{
    if (!find_summary(&v->out, &v->summary))
        find_summary(&v->err, &v->summary);
    if (v->timed_out)
        v->rule = RULE_TIMEOUT_DEADLINE;
    else if (v->has_returncode && v->returncode == 0)
        v->rule = v->is_pytest || v->summary.found ? RULE_PASSED_EXIT_0 : unittest_pass_rule(v);
    else if (v->has_spawn_error)
        v->rule = RULE_OTHER_SPAWN_ERROR;
    else if (!v->has_returncode)
        v->rule = RULE_OTHER_NO_STATUS;
    else
        v->rule = failure_rule(v);
}

/* ------------------------------------------------------------------------ reasons */

/* The name Python's signal.Signals gives signum on this platform, or NULL. Where names
 * alias one number (SIGIOT/SIGABRT, SIGCLD/SIGCHLD, SIGPOLL/SIGIO) Python picks the first in
 * alphabetical order, so only that one is listed. */
static const char *signal_name(unsigned long long signum)
{
    static const struct {
        int number;
        const char *name;
    } names[] = {
        {SIGHUP, "SIGHUP"},   {SIGINT, "SIGINT"},       {SIGQUIT, "SIGQUIT"},
        {SIGILL, "SIGILL"},   {SIGTRAP, "SIGTRAP"},     {SIGABRT, "SIGABRT"},
        {SIGBUS, "SIGBUS"},   {SIGFPE, "SIGFPE"},       {SIGKILL, "SIGKILL"},
        {SIGUSR1, "SIGUSR1"}, {SIGSEGV, "SIGSEGV"},     {SIGUSR2, "SIGUSR2"},
        {SIGPIPE, "SIGPIPE"}, {SIGALRM, "SIGALRM"},     {SIGTERM, "SIGTERM"},
#ifdef SIGSTKFLT
        {SIGSTKFLT, "SIGSTKFLT"},
#endif
        {SIGCHLD, "SIGCHLD"}, {SIGCONT, "SIGCONT"},     {SIGSTOP, "SIGSTOP"},
        {SIGTSTP, "SIGTSTP"}, {SIGTTIN, "SIGTTIN"},     {SIGTTOU, "SIGTTOU"},
        {SIGURG, "SIGURG"},   {SIGXCPU, "SIGXCPU"},     {SIGXFSZ, "SIGXFSZ"},
        {SIGVTALRM, "SIGVTALRM"}, {SIGPROF, "SIGPROF"}, {SIGWINCH, "SIGWINCH"},
#ifdef SIGIO
        {SIGIO, "SIGIO"},
#endif
#ifdef SIGPWR
        {SIGPWR, "SIGPWR"},
#endif
        {SIGSYS, "SIGSYS"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if ((unsigned long long)names[i].number == signum)
            return names[i].name;
    }
#ifdef SIGRTMIN
    /* Run-time values in glibc (it reserves the first real-time signals for itself). */
    if (signum == (unsigned long long)SIGRTMIN)
        return "SIGRTMIN";
    if (signum == (unsigned long long)SIGRTMAX)
        return "SIGRTMAX";
#endif
    return NULL;
}

/* "exit N" or "killed by signal N (NAME)" into out (at least 64 bytes). */
static void format_status(long long returncode, char *out, size_t size)
{
    if (returncode >= 0) {
        snprintf(out, size, "exit %lld", returncode);
        return;
    }
    /* Unsigned negation: -LLONG_MIN does not fit in a long long. */
    unsigned long long signum = 0ULL - (unsigned long long)returncode;
    const char *name = signal_name(signum);
    if (name)
        snprintf(out, size, "killed by signal %llu (%s)", signum, name);
    else
        snprintf(out, size, "killed by signal %llu", signum);
}

/* The quote as text: "..." marks where the window cut the line. New reference or NULL. */
static PyObject *quote_text(const quoted_line *quote)
{
    PyObject *body = PyUnicode_DecodeUTF8(quote->text, (Py_ssize_t)quote->len, "replace");
    if (body == NULL)
        return NULL;
    PyObject *text = PyUnicode_FromFormat("%s%U%s", quote->cut_head ? "..." : "", body,
                                          quote->cut_tail ? "..." : "");
    Py_DECREF(body);
    return text;
}

/* The reason of the rule v->rule fired for, worded as _classify_py._decide words it.
 * New reference, or NULL with an exception set. */
static PyObject *make_reason(const verdict *v, PyObject *spawn_error, bool escalated,
                             long long killed)
{
    PyObject *summary = NULL, *quote = NULL, *pytest_part = NULL, *reason = NULL;
    char status[64] = "";
    /* Only pytest's own exit status is pytest's: a wrapper's output holds just its summary. */
    const char *label = v->is_pytest ? "pytest: " : "pytest summary: ";
    /* %V below takes (object or NULL, fallback text): that is how optional parts are left out. */
    if (v->summary.found &&
        !(summary = PyUnicode_DecodeASCII(v->summary.text, (Py_ssize_t)v->summary.len, "strict")))
        goto cleanup;
    if (v->quote.found && !(quote = quote_text(&v->quote)))
        goto cleanup;
    if (v->has_returncode) {
        format_status(v->returncode, status, sizeof status);
        pytest_part = summary ? PyUnicode_FromFormat("%s%U (%s)", label, summary, status)
                              : PyUnicode_FromString(status);
        if (!pytest_part)
            goto cleanup;
    }
    const char *pytest_exit = NULL;
    switch (v->rule) {
    case RULE_TIMEOUT_DEADLINE:
        reason = PyUnicode_FromFormat(
            "the runner's deadline fired; %lld process%s signalled, %s%s%V", killed,
            killed == 1 ? "" : "es", escalated ? "SIGKILL needed" : "SIGTERM sufficed",
            summary ? "; last pytest summary: " : "", summary, "");
        break;
    case RULE_PASSED_EXIT_0:
        reason = PyUnicode_FromFormat("exit 0%s%V", summary ? ": " : "", summary, "");
        break;
    case RULE_OTHER_SPAWN_ERROR:
        reason = PyUnicode_FromFormat("could not start: %U", spawn_error);
        break;
    case RULE_OTHER_NO_STATUS:
        reason = PyUnicode_FromString("no exit status and no spawn error");
        break;
    case RULE_LOCK_GATE:
    case RULE_LOCK_GIT:
    case RULE_LOCK_SQLITE:
        reason = PyUnicode_FromFormat("%s; lock held: %U", status, quote);
        break;
    case RULE_OTHER_ENVIRONMENT:
        reason = PyUnicode_FromFormat("%s before pytest started: pytest is not importable: %U",
                                      status, quote);
        break;
    case RULE_RED_COLLECTION_ERROR:
        reason = PyUnicode_FromFormat("%U; %U", pytest_part, quote);
        break;
    case RULE_RED_TESTS_FAILED:
    case RULE_RED_TEST_ERRORS:
        reason = Py_NewRef(pytest_part);
        break;
    case RULE_RED_TEST_TIMEOUT:
        reason = PyUnicode_FromFormat("exit 1: a per-test pytest-timeout fired; %s%V",
                                      summary ? label : "", summary, "no pytest summary");
        break;
    case RULE_OTHER_NO_TEST_FILES:
        reason = PyUnicode_FromFormat("%s: the configured testpaths hold no test files: %U",
                                      status, quote);
        break;
    case RULE_RED_UNITTEST:
        reason = PyUnicode_FromFormat("unittest: %U (%s)", quote, status);
        break;
    case RULE_OTHER_UNITTEST_NONE:
        reason = PyUnicode_FromFormat("exit 0 but unittest ran no tests (%U): nothing was tested",
                                      quote);
        break;
    case RULE_OTHER_UNITTEST_SKIPPED:
        reason = PyUnicode_FromFormat("exit 0 but unittest skipped every test it ran (%U): "
                                      "nothing was tested", quote);
        break;
    case RULE_RED_EXIT_1:
        reason = summary ? Py_NewRef(pytest_part)
                         : PyUnicode_FromString(
                               "exit 1 with no pytest summary (pytest: tests failed)");
        break;
    case RULE_OTHER_SIGNAL:
        reason = PyUnicode_FromFormat("%s%s%s%V", status, summary ? "; " : "",
                                      summary ? label : "", summary, "");
        break;
    case RULE_OTHER_INTERRUPTED:
        pytest_exit = "interrupted";
        break;
    case RULE_OTHER_INTERNAL_ERROR:
        pytest_exit = "internal error";
        break;
    case RULE_OTHER_USAGE_ERROR:
        pytest_exit = "usage error";
        break;
    case RULE_OTHER_NO_TESTS:
        pytest_exit = "no tests collected";
        break;
    case RULE_OTHER_EXIT_STATUS:
        reason = PyUnicode_FromFormat("%s%s%V", status,
                                      !summary ? "" : v->is_pytest ? ": " : "; pytest summary: ",
                                      summary, "");
        break;
    }
    if (pytest_exit)
        reason = PyUnicode_FromFormat("%s (pytest: %s)%s%V", status, pytest_exit,
                                      summary ? ": " : "", summary, "");
cleanup:
    Py_XDECREF(summary);
    Py_XDECREF(quote);
    Py_XDECREF(pytest_part);
    return reason;
}

/* ------------------------------------------------------------------------ entry point */

/* Convert an int argument (not bool), saturated to long long as the Python twin does.
 * Return 0, or -1 with TypeError set. */
static int int_arg(PyObject *obj, const char *name, bool none_ok, bool *present, long long *value)
{
    *present = false;
    if (obj == Py_None && none_ok)
        return 0;
    if (!PyLong_Check(obj) || PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int%s", name, none_ok ? " or None" : "");
        return -1;
    }
    int overflow = 0;
    /* PyLong_Check passed, so this reads the int value itself and cannot fail. */
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    *value = overflow > 0 ? LLONG_MAX : overflow < 0 ? LLONG_MIN : v;
    *present = true;
    return 0;
}

/* Check that obj is exactly a bool. Return 0, or -1 with TypeError set. */
static int bool_arg(PyObject *obj, const char *name, bool *value)
{
    if (!PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a bool", name);
        return -1;
    }
    *value = obj == Py_True;
    return 0;
}

/* Check that obj is bytes and point buf at its data. Return 0, or -1 with TypeError set. */
static int bytes_arg(PyObject *obj, const char *name, buffer *buf)
{
    if (!PyBytes_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes", name);
        return -1;
    }
    buf->data = (const unsigned char *)PyBytes_AS_STRING(obj);
    buf->len = (size_t)PyBytes_GET_SIZE(obj);
    return 0;
}

const char pg_classify_doc[] =
    "classify(stdout, stderr, returncode, timed_out, spawn_error, escalated,\n"
    "         killed_at_deadline, is_pytest, /) -> (kind, rule, reason, infra)\n"
    "\n"
    "Classify a finished run by the rules of docs/verdicts.md (first match wins).\n"
    "Raises TypeError for an argument of the wrong type, and nothing else.";

/* classify(...) -> (kind, rule, reason, infra); TypeError is the only exception it raises
 * (MemoryError aside). */
PyObject *pg_classify(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "classify() takes exactly 8 arguments (%zd given)", nargs);
        return NULL;
    }
    verdict v;
    memset(&v, 0, sizeof v);
    bool escalated, killed_present;
    long long killed = 0;
    if (bytes_arg(args[0], "stdout", &v.out) < 0 || bytes_arg(args[1], "stderr", &v.err) < 0 ||
        int_arg(args[2], "returncode", true, &v.has_returncode, &v.returncode) < 0 ||
        bool_arg(args[3], "timed_out", &v.timed_out) < 0)
        return NULL;
    if (args[4] != Py_None && !PyUnicode_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "spawn_error must be a str or None");
        return NULL;
    }
    v.has_spawn_error = args[4] != Py_None;
    if (bool_arg(args[5], "escalated", &escalated) < 0 ||
        int_arg(args[6], "killed_at_deadline", false, &killed_present, &killed) < 0 ||
        bool_arg(args[7], "is_pytest", &v.is_pytest) < 0)
        return NULL;

    if (v.out.len + v.err.len >= RELEASE_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        decide(&v);
        Py_END_ALLOW_THREADS
    } else {
        decide(&v);
    }

    PyObject *reason = make_reason(&v, args[4], escalated, killed);
    if (reason == NULL)
        return NULL;
    PyObject *result = Py_BuildValue("(ssNO)", rules[v.rule].kind, rules[v.rule].id, reason,
                                     rules[v.rule].infra ? Py_True : Py_False);
    return result;
}
