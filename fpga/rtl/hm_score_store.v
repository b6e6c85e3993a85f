// hm_score_store: the scores of one query slot, kept on chip while the memory streams, with
// what the exact top-k needs to find its threshold without re-reading them all:
//   - scores, W to a word, so the final index-ascending scan reads W per cycle;
//   - a 4096-bin histogram over a monotone 12-bit key of the score (sign, bit length, five
//     mantissa bits: bins about 3% wide at any magnitude), each bin with its count and the
//     head of a linked list (next[]) through the rows that fell in it, plus 64 coarse counts;
//   - the running maximum (threshold-bitmap mode).
// One score per cycle; `wop` merges it with the stored one (partial head sums of a query split
// over passes), `wfinal` marks it complete (histogram and maximum). `clear` forgets the
// histogram and maximum in one cycle (valid bits), so back-to-back calls need no sweep.
`default_nettype none

module hm_score_store #(
    parameter NMAX = 1024,  // rows; a power of two, at least 2 * W
    parameter W    = 64,    // scores per word
    parameter XW   = 10     // $clog2(NMAX)
) (
    input wire clk,
    input wire clear,

    input wire          we,
    input wire [XW-1:0] widx,
    input wire [  63:0] wval,
    input wire [   1:0] wop,    // 0 write, 1 add to the stored score, 2 max with it
    input wire          wfinal,

    input  wire [XW-1:0] raddr,  // random read: a score and its list successor
    output wire [  63:0] rscore,
    output wire [XW-1:0] rnext,

    input  wire [  11:0] hbin,  // histogram read
    output wire [  XW:0] hcount,
    output wire [XW-1:0] hhead,

    input  wire [   5:0] cgroup,  // coarse histogram read (64 bins per group)
    output wire [  XW:0] ccount,

    input  wire [XW-$clog2(W)-1:0] waddr,  // wide read
    output wire [      W*64-1:0] wword,

    output reg [63:0] smax,
    output reg        sany
);
    localparam LW = $clog2(W);
    localparam WA = XW - LW;

    reg  [W*64-1:0] scores    [0:(NMAX/W)-1];
    reg  [  XW-1:0] next_row  [     0:NMAX-1];
    reg  [    XW:0] bin_count [     0:4095];
    reg  [  XW-1:0] bin_head  [     0:4095];
    reg  [    4095:0] bin_valid;
    reg  [    XW:0] coarse    [       0:63];

    // write side: read-modify-write of the stored score and of the histogram bin, evaluated
    // in the clocked block only for a write
    reg [W*64-1:0] wword_old;
    reg [63:0] old, val;
    reg [11:0] bin;
    reg [XW:0] bin_count_old;

    // read side
    wire [W*64-1:0] rword = scores[raddr[XW-1:LW]];
    assign rscore = rword[{raddr[LW-1:0], 6'd0}+:64];
    assign rnext = next_row[raddr];
    wire [XW:0] hcount_raw = bin_count[hbin];
    assign hcount = bin_valid[hbin] ? hcount_raw : {(XW + 1) {1'b0}};
    assign hhead = bin_head[hbin];
    assign ccount = coarse[cgroup];
    assign wword = scores[waddr];

    integer g;
    always @(posedge clk) begin
        if (we) begin
            wword_old = scores[widx[XW-1:LW]];
            old = wword_old[{widx[LW-1:0], 6'd0}+:64];
            case (wop)
                2'd1: val = old + wval;
                2'd2: val = ($signed(wval) > $signed(old)) ? wval : old;
                default: val = wval;
            endcase
            bin = hm_bin_key(val);
            bin_count_old = bin_valid[bin] ? bin_count[bin] : {(XW + 1) {1'b0}};
            scores[widx[XW-1:LW]][{widx[LW-1:0], 6'd0}+:64] <= val;
        end
        if (clear) begin
            bin_valid <= 4096'd0;
            for (g = 0; g < 64; g = g + 1) coarse[g] <= {(XW + 1) {1'b0}};
            sany <= 1'b0;
        end else if (we && wfinal) begin
            next_row[widx]  <= bin_head[bin];
            bin_head[bin]   <= widx;
            bin_count[bin]  <= bin_count_old + 1'b1;
            bin_valid[bin]  <= 1'b1;
            coarse[bin[11:6]] <= coarse[bin[11:6]] + 1'b1;
            if (!sany || $signed(val) > $signed(smax)) smax <= val;
            sany <= 1'b1;
        end
    end

    // Monotone 12-bit key: {non-negative, bit length e of |s| (6 bits), 5 bits after the
    // leading one}, complemented for negative scores (|s| taken as ~s). Bins whose e <= 6 hold
    // a single value.
    function [11:0] hm_bin_key;
        input [63:0] s;
        reg [62:0] x;
        reg [5:0] e;
        reg [62:0] m;
        reg [10:0] em;
        integer i;
        begin
            x = s[63] ? ~s[62:0] : s[62:0];
            e = 6'd0;
            for (i = 0; i < 63; i = i + 1) if (x[i]) e = i[5:0] + 6'd1;
            if (e > 6'd5) m = x >> (e - 6'd6);
            else m = x << (6'd6 - e);
            em = {e, m[4:0]};
            hm_bin_key = s[63] ? {1'b0, ~em} : {1'b1, em};
        end
    endfunction
endmodule

`default_nettype wire
