// hm_topk: the Retrieval unit. It keeps the scores of SLOTS queries as they stream in (one
// hm_score_store each) and, per command, selects from one slot:
//   top-k (exact, by the kernels' contract: the k largest, ties to the lower index, indices
//   ascending):
//     1. coarse then fine histogram scan from the top finds the bin b* holding the k-th
//        largest score, `above` scores in higher bins, so need = k - above come from b*;
//     2. a bin that holds a single value gives the threshold T at once; otherwise its linked
//        list is walked (one row per cycle) into the candidate buffer, tracking min and max;
//     3. T = the need-th largest candidate, built bit by bit below the common prefix of min
//        and max, each bit one counting pass over the candidates (W per cycle); then one pass
//        counts the candidates above T, which fixes how many ties at T are taken;
//     4. an index-ascending scan of the slot's scores, W per cycle, selects s > T, and s == T
//        while ties are still needed (the lowest indices), so the output is ascending for free.
//   threshold bitmap: the same scan with s >= max - delta, packed 32 candidates to a word.
// Selected indices and bitmap words leave through hm_index_packer as 512-bit beats.
`default_nettype none

module hm_topk #(
    parameter SLOTS = 1,
    parameter NMAX  = 1024,  // rows per slot; a power of two, at least 2 * W
    parameter W     = 64     // scores per scan cycle: 32 .. 512, a power of two
) (
    input wire clk,
    input wire rst,
    input wire clear,  // a new pass: forget histograms and maxima

    input wire                          in_valid,
    input wire [$clog2(NMAX)-1:0]       in_idx,
    input wire [           SLOTS-1:0]   in_mask,
    input wire [        SLOTS*64-1:0]   in_scores,
    input wire [                 1:0]   in_op,     // 0 write, 1 add, 2 max (with the stored)
    input wire                          in_final,  // complete scores: histogram, maximum

    input  wire                           cmd_valid,
    output wire                           cmd_ready,
    input  wire [((SLOTS > 1) ? $clog2(SLOTS) : 1)-1:0] cmd_slot,
    input  wire [          $clog2(NMAX):0] cmd_n,
    input  wire [          $clog2(NMAX):0] cmd_k,
    input  wire                           cmd_bitmap,
    input  wire [                   31:0] cmd_delta,
    output reg                            cmd_done,

    input  wire flush,  // emit the partial last beat
    output wire idle,

    output wire [511:0] out_data,
    output wire [  4:0] out_items,
    output wire         out_valid,
    input  wire         out_ready
);
    localparam XW = $clog2(NMAX);
    localparam LW = $clog2(W);
    localparam WA = XW - LW;
    localparam SW = (SLOTS > 1) ? $clog2(SLOTS) : 1;
    localparam [63:0] SIGN = 64'h8000_0000_0000_0000;

    localparam [3:0] S_IDLE = 4'd0, S_PREP = 4'd1, S_COARSE = 4'd2, S_FINE = 4'd3,
                     S_EXACT = 4'd4, S_TRAV = 4'd5, S_DECIDE = 4'd6, S_CNT = 4'd7,
                     S_CNT_END = 4'd8, S_LEVEL = 4'd9, S_EMIT = 4'd10, S_DONE = 4'd11;

    reg [3:0] state;

    // -- command registers and selection state --------------------------------------------
    reg  [SW-1:0] sel;
    reg  [  XW:0] n_r;
    reg  [  XW:0] k_r;
    reg           bitmap_r;
    reg  [  31:0] delta_r;
    reg  [  63:0] thr;  // signed threshold of bitmap mode

    reg  [   5:0] g;
    reg  [  11:0] b;
    reg  [  XW:0] above;
    reg  [  XW:0] need;
    reg  [  XW:0] c;
    reg  [XW-1:0] ptr;
    reg  [  XW:0] j;
    reg  [  63:0] vmin;
    reg  [  63:0] vmax;
    reg  [  63:0] tcur;
    reg  [  63:0] cmp_t;
    reg  [   5:0] bitpos;
    reg           strict;
    reg  [  XW:0] cnt;
    reg  [  WA:0] wi;
    reg  [  WA:0] cwords;
    reg  [ W-1:0] hits_r;
    reg           hits_v;
    reg  [  63:0] T;
    reg  [  XW:0] tie_left;
    reg  [  WA:0] ea;
    reg  [  WA:0] ewords;

    // -- the slots --------------------------------------------------------------------------
    wire [  SLOTS*64-1:0] rscore_all;
    wire [  SLOTS*XW-1:0] rnext_all;
    wire [SLOTS*(XW+1)-1:0] hcount_all;
    wire [  SLOTS*XW-1:0] hhead_all;
    wire [SLOTS*(XW+1)-1:0] ccount_all;
    wire [SLOTS*W*64-1:0] wword_all;
    wire [  SLOTS*64-1:0] smax_all;

    genvar s;
    generate
        for (s = 0; s < SLOTS; s = s + 1) begin : g_slot
            hm_score_store #(
                .NMAX(NMAX),
                .W(W),
                .XW(XW)
            ) u_store (
                .clk(clk),
                .clear(clear),
                .we(in_valid && in_mask[s]),
                .widx(in_idx),
                .wval(in_scores[64*s+:64]),
                .wop(in_op),
                .wfinal(in_final),
                .raddr(ptr),
                .rscore(rscore_all[64*s+:64]),
                .rnext(rnext_all[XW*s+:XW]),
                .hbin(b),
                .hcount(hcount_all[(XW+1)*s+:XW+1]),
                .hhead(hhead_all[XW*s+:XW]),
                .cgroup(g),
                .ccount(ccount_all[(XW+1)*s+:XW+1]),
                .waddr(ea[WA-1:0]),
                .wword(wword_all[W*64*s+:W*64]),
                .smax(smax_all[64*s+:64]),
                .sany()
            );
        end
    endgenerate

    wire [    63:0] rscore = rscore_all[64*sel+:64];
    wire [  XW-1:0] rnext = rnext_all[XW*sel+:XW];
    wire [    XW:0] hcount = hcount_all[(XW+1)*sel+:XW+1];
    wire [  XW-1:0] hhead = hhead_all[XW*sel+:XW];
    wire [    XW:0] ccount = ccount_all[(XW+1)*sel+:XW+1];
    wire [W*64-1:0] wword = wword_all[W*64*sel+:W*64];
    wire [    63:0] smax = smax_all[64*sel+:64];

    // -- candidate buffer -------------------------------------------------------------------
    reg  [W*64-1:0] cb[0:(NMAX/W)-1];
    wire [W*64-1:0] cb_word = cb[wi[WA-1:0]];

    // one counting pass word: candidates >= cmp_t (or > cmp_t when strict)
    function [W-1:0] pass_hits;
        input [W*64-1:0] word;
        input [WA:0] wordi;
        input [XW:0] count;
        input [63:0] t;
        input gt;
        integer p;
        begin
            for (p = 0; p < W; p = p + 1) begin
                pass_hits[p] = 1'b0;
                if (({{(XW - WA) {1'b0}}, wordi} << LW) + p < {1'b0, count})
                    pass_hits[p] = gt ? (word[64*p+:64] > t) : (word[64*p+:64] >= t);
            end
        end
    endfunction

    integer i;
    function [XW:0] popcount;
        input [W-1:0] m;
        integer p;
        begin
            popcount = {(XW + 1) {1'b0}};
            for (p = 0; p < W; p = p + 1) popcount = popcount + m[p];
        end
    endfunction

    function [5:0] msb64;
        input [63:0] v;
        integer p;
        begin
            msb64 = 6'd0;
            for (p = 0; p < 64; p = p + 1) if (v[p]) msb64 = p[5:0];
        end
    endfunction

    // -- the index-ascending scan (one word of W scores per cycle) ---------------------------
    reg [W-1:0] emask;
    reg [XW:0] taken;
    always @(*) begin
        emask = {W{1'b0}};
        taken = {(XW + 1) {1'b0}};
        for (i = 0; i < W; i = i + 1) begin
            if (({{(XW - WA) {1'b0}}, ea} << LW) + i < {1'b0, n_r}) begin
                if (bitmap_r) begin
                    emask[i] = $signed(wword[64*i+:64]) >= $signed(thr);
                end else if ((wword[64*i+:64] ^ SIGN) > T) begin
                    emask[i] = 1'b1;
                end else if ((wword[64*i+:64] ^ SIGN) == T && taken < tie_left) begin
                    emask[i] = 1'b1;
                    taken = taken + 1'b1;
                end
            end
        end
    end

    // bitmap words left: ceil(n / 32) - 32-bit words already emitted
    wire [XW:0] bm_words = (n_r + 6'd31) >> 5;
    localparam [4:0] WPW = W / 32;  // bitmap words per scan word (W <= 512)
    wire [XW+1:0] bm_done = ea * WPW;
    wire [XW+1:0] bm_left = {1'b0, bm_words} - bm_done;
    wire [4:0] nwords = (bm_left < WPW) ? bm_left[4:0] : WPW;

    wire emit_valid = state == S_EMIT;
    wire emit_ready;
    wire packer_idle;

    hm_index_packer #(
        .W(W)
    ) u_packer (
        .clk(clk),
        .rst(rst),
        .in_valid(emit_valid),
        .in_ready(emit_ready),
        .in_kind(bitmap_r),
        .in_mask(emask),
        .in_base({{(31 - XW) {1'b0}}, ea, {LW{1'b0}}}),
        .in_words({{(512 - W) {1'b0}}, emask}),
        .in_nwords(nwords),
        .flush(flush),
        .idle(packer_idle),
        .out_data(out_data),
        .out_items(out_items),
        .out_valid(out_valid),
        .out_ready(out_ready)
    );

    assign cmd_ready = state == S_IDLE;
    assign idle = state == S_IDLE && packer_idle;

    wire [XW:0] acc_ccount = above + ccount;
    wire [XW:0] acc_hcount = above + hcount;
    wire [5:0] bin_e = b[11] ? b[10:5] : ~b[10:5];
    wire [5:0] top_bit = msb64(vmin ^ vmax);
    wire [63:0] below_top = {64{1'b1}} >> (6'd63 - top_bit);  // bits [top_bit:0]
    wire [63:0] tnext = (cnt >= need) ? cmp_t : tcur;
    wire [63:0] u_now = rscore ^ SIGN;

    always @(posedge clk) begin
        cmd_done <= 1'b0;
        if (rst) begin
            state <= S_IDLE;
        end else begin
            case (state)
                S_IDLE:
                if (cmd_valid) begin
                    sel      <= cmd_slot;
                    n_r      <= cmd_n;
                    k_r      <= cmd_k;
                    bitmap_r <= cmd_bitmap;
                    delta_r  <= cmd_delta;
                    state    <= S_PREP;
                end
                S_PREP: begin
                    thr   <= smax - {32'd0, delta_r};
                    g     <= 6'd63;
                    above <= 0;
                    ea    <= 0;
                    ewords <= (n_r + W - 1) >> LW;
                    state <= bitmap_r ? S_EMIT : S_COARSE;
                end
                S_COARSE:
                if (acc_ccount >= k_r) begin
                    b     <= {g, 6'h3f};
                    state <= S_FINE;
                end else begin
                    above <= acc_ccount;
                    g     <= g - 1'b1;
                end
                S_FINE:
                if (acc_hcount >= k_r) begin
                    need  <= k_r - above;
                    c     <= hcount;
                    ptr   <= hhead;
                    j     <= 0;
                    state <= (bin_e <= 6'd6) ? S_EXACT : S_TRAV;
                end else begin
                    above <= acc_hcount;
                    b     <= b - 1'b1;
                end
                S_EXACT: begin
                    T        <= u_now;
                    tie_left <= need;
                    state    <= S_EMIT;
                end
                S_TRAV: begin
                    cb[j[XW-1:LW]][{j[LW-1:0], 6'd0}+:64] <= u_now;
                    if (j == 0 || u_now < vmin) vmin <= u_now;
                    if (j == 0 || u_now > vmax) vmax <= u_now;
                    ptr <= rnext;
                    j   <= j + 1'b1;
                    if (j + 1'b1 == c) state <= S_DECIDE;
                end
                S_DECIDE: begin
                    wi     <= 0;
                    cnt    <= 0;
                    hits_v <= 1'b0;
                    cwords <= (c + W - 1) >> LW;
                    if (vmin == vmax) begin
                        T        <= vmin;
                        tie_left <= need;
                        state    <= S_EMIT;
                    end else if (need == c) begin
                        T      <= vmin;
                        cmp_t  <= vmin;
                        strict <= 1'b1;
                        state  <= S_CNT;
                    end else begin
                        bitpos <= top_bit;
                        tcur   <= vmax & ~below_top;
                        cmp_t  <= (vmax & ~below_top) | (64'd1 << top_bit);
                        strict <= 1'b0;
                        state  <= S_CNT;
                    end
                end
                S_CNT: begin
                    hits_r <= pass_hits(cb_word, wi, c, cmp_t, strict);
                    hits_v <= 1'b1;
                    if (hits_v) cnt <= cnt + popcount(hits_r);
                    wi <= wi + 1'b1;
                    if (wi + 1'b1 == cwords) state <= S_CNT_END;
                end
                S_CNT_END: begin
                    cnt    <= cnt + popcount(hits_r);
                    hits_v <= 1'b0;
                    state  <= S_LEVEL;
                end
                S_LEVEL: begin
                    wi <= 0;
                    cnt <= 0;
                    if (strict) begin
                        tie_left <= need - cnt;
                        state    <= S_EMIT;
                    end else if (bitpos == 6'd0) begin
                        T      <= tnext;
                        cmp_t  <= tnext;
                        strict <= 1'b1;
                        state  <= S_CNT;
                    end else begin
                        tcur   <= tnext;
                        cmp_t  <= tnext | (64'd1 << (bitpos - 1'b1));
                        bitpos <= bitpos - 1'b1;
                        state  <= S_CNT;
                    end
                end
                S_EMIT:
                if (emit_ready) begin
                    tie_left <= tie_left - taken;
                    ea       <= ea + 1'b1;
                    if (ea + 1'b1 == ewords) state <= S_DONE;
                end
                S_DONE: begin
                    cmd_done <= 1'b1;
                    state    <= S_IDLE;
                end
                default: state <= S_IDLE;
            endcase
        end
    end
endmodule

`default_nettype wire
