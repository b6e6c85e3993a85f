// hm_histogram: what the exact top-k of one query slot needs to find its threshold without
// sorting: a 4096-bin histogram of the slot's final scores over a monotone 12-bit key (sign,
// bit length, five mantissa bits: bins about 3% wide at any magnitude), 64 coarse counts
// (one per 64 bins), and the running maximum (threshold-bitmap mode). The scores themselves
// live in hm_score_mem.
//
// One final score per cycle, in three stages: the score is registered (a), its bin's count is
// read from block RAM (a -> b) and written back plus one (b). The RAM is write-through, so an
// update reads the count that the update before it writes in the same cycle. `busy` is high
// while an update is in flight. `clear` forgets everything in one cycle: a count is valid only
// when its group of 64 bins has been written since the clear (64 flip-flops) and its own bit
// in the group's word is set (64 x 64 bits of distributed RAM), so back-to-back calls need no
// sweep of the counts. `hcount` is the count of bin `hbin` one cycle after the address.
`default_nettype none

module hm_histogram #(
    parameter NMAX = 1024,  // rows; a power of two
    parameter XW   = 10     // $clog2(NMAX)
) (
    input wire clk,
    input wire clear,

    input wire        we,    // a final score
    input wire [63:0] wval,
    output wire       busy,

    input  wire [11:0] hbin,  // fine histogram read, one cycle later on hcount
    output wire [  XW:0] hcount,

    input  wire [   5:0] cgroup,  // coarse histogram read (64 bins per group), same cycle
    output wire [  XW:0] ccount,

    output reg [63:0] smax,
    output reg        sany
);
    reg [63:0] group_valid;
    (* ram_style = "distributed" *) reg [63:0] vword[0:63];  // bin written since the clear
    reg [XW:0] coarse[0:63];

    // stage a: the registered score and its bin; the count is read
    reg        we_a;
    reg [63:0] val_a;
    wire [11:0] bin_a = hm_bin_key(val_a);
    // stage b: count + 1 written back
    reg        we_b;
    reg [63:0] val_b;
    reg [11:0] bin_b;
    reg [11:0] hbin_q;

    assign busy = we_a || we_b;

    wire [XW:0] cnt_q;
    wire [XW:0] cnt_new;
    wire [63:0] vw_b = group_valid[bin_b[11:6]] ? vword[bin_b[11:6]] : 64'd0;
    wire valid_b = vw_b[bin_b[5:0]];
    assign cnt_new = (valid_b ? cnt_q : {(XW + 1) {1'b0}}) + 1'b1;

    hm_ram #(
        .DEPTH(4096),
        .WIDTH(XW + 1),
        .AW(12),
        .ULTRA(0)
    ) u_counts (
        .clk(clk),
        .we(we_b),
        .waddr(bin_b),
        .wdata(cnt_new),
        .raddr(we_a ? bin_a : hbin),
        .rdata(cnt_q)
    );

    wire [63:0] vw_h = group_valid[hbin_q[11:6]] ? vword[hbin_q[11:6]] : 64'd0;
    assign hcount = vw_h[hbin_q[5:0]] ? cnt_q : {(XW + 1) {1'b0}};
    assign ccount = coarse[cgroup];

    integer g;
    always @(posedge clk) begin
        we_a   <= we && !clear;
        val_a  <= wval;
        we_b   <= we_a && !clear;
        val_b  <= val_a;
        bin_b  <= bin_a;
        hbin_q <= hbin;
        if (clear) begin
            group_valid <= 64'd0;
            for (g = 0; g < 64; g = g + 1) coarse[g] <= {(XW + 1) {1'b0}};
            sany <= 1'b0;
        end else if (we_b) begin
            vword[bin_b[11:6]]       <= vw_b | (64'd1 << bin_b[5:0]);
            group_valid[bin_b[11:6]] <= 1'b1;
            coarse[bin_b[11:6]]      <= coarse[bin_b[11:6]] + 1'b1;
            if (!sany || $signed(val_b) > $signed(smax)) smax <= val_b;
            sany <= 1'b1;
        end
    end

    // Monotone 12-bit key: {non-negative, bit length e of |s| (6 bits), 5 bits after the
    // leading one}, complemented for negative scores (|s| taken as ~s). Bins whose e <= 6 hold
    // a single value. hm_topk inverts it (the score range of a bin).
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
