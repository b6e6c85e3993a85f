// hm_mux: an N-way select of WIDTH-bit items (item i at in[WIDTH*i +: WIDTH]) written as a
// binary tree of 2:1 selects, one level per bit of `sel` (LSB first). Synthesis maps two
// levels to a LUT6, so an 8-way select costs about two LUTs per bit; an indexed part-select
// (in[WIDTH*sel +: WIDTH]) is lowered by yosys to a shifter of all N*WIDTH bits instead.
`default_nettype none

module hm_mux #(
    parameter N     = 2,  // items; a power of two
    parameter WIDTH = 1,
    parameter SW    = (N > 1) ? $clog2(N) : 1
) (
    input  wire [N*WIDTH-1:0] in,
    input  wire [     SW-1:0] sel,
    output reg  [  WIDTH-1:0] out
);
    localparam LEVELS = (N > 1) ? $clog2(N) : 0;
    reg [N*WIDTH-1:0] t;
    integer k, j;
    always @(*) begin
        t = in;
        // level k halves the items in place: item j <- item 2j or 2j+1 (read before written)
        for (k = 0; k < LEVELS; k = k + 1)
            for (j = 0; j < (N >> (k + 1)); j = j + 1)
                t[WIDTH*j+:WIDTH] = sel[k] ? t[WIDTH*(2*j+1)+:WIDTH] : t[WIDTH*(2*j)+:WIDTH];
        out = t[WIDTH-1:0];
    end
endmodule

`default_nettype wire
